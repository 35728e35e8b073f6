#!/usr/bin/env bash
# build-kube-apiserver.sh VERSION OUT builds kube-apiserver from the module
# k8s.io/kubernetes@VERSION, fetched through the Go module proxy, into OUT.
# The module zip has no staging/ directory, so its replace directives are
# swapped for the published k8s.io/* modules of the same release
# (v1.X.Y -> v0.X.Y). make test runs it once; the Go caches make a rebuild
# after `make clean` quick. About 5-7 minutes and 1.8 GB from empty caches
# on 2 cores; run it under nice.
set -euo pipefail
version=${1:?usage: build-kube-apiserver.sh VERSION OUT}
out=${2:?usage: build-kube-apiserver.sh VERSION OUT}
go=${GO:-go}
staging=v0.${version#v1.}
minor=${version#v1.}
minor=${minor%%.*}

dir=$($go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$dir" ] || { echo "go mod download k8s.io/kubernetes@$version gave no directory" >&2; exit 1; }
work=$(mktemp -d)
trap 'chmod -R u+w "$work"; rm -rf "$work"' EXIT
cp -r "$dir" "$work/src"
chmod -R u+w "$work/src"
cd "$work/src"
rm -rf vendor go.work go.work.sum
for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/.*#\1#p' go.mod); do
	$go mod edit -dropreplace="$m" -require="$m@$staging"
done
mkdir -p "$(dirname "$out")"
# Built under another name, so that an interrupted build leaves nothing a
# test would take for kube-apiserver (it looks for kube-apiserver-v*).
partial="$(dirname "$out")/.$(basename "$out").partial"
GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 $go build -trimpath -o "$partial" -ldflags "-s -w \
	-X k8s.io/component-base/version.gitVersion=$version \
	-X k8s.io/component-base/version.gitMajor=1 \
	-X k8s.io/component-base/version.gitMinor=$minor \
	-X k8s.io/component-base/version.gitTreeState=clean" ./cmd/kube-apiserver
mv "$partial" "$out"
