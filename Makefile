# imds-proxy. `make test` and `make demo` work on a fresh machine: they
# install what they need (Go modules through the module proxy).
GO           ?= go
VERSION      ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
AEMM_MODULE  := github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock@v1.13.0
BIN          := $(CURDIR)/bin
SHELL        := /bin/bash
.SHELLFLAGS  := -o pipefail -c
# The demo and benchmark print a table from the e2e package; these lines are go test's own.
GO_TEST_NOISE := '^(=== RUN|--- PASS|PASS$$|ok )'

.PHONY: build test test-arm64 lint demo demo-loopback bench bench-load image clean deps

## build: bin/imds-proxy, bin/imds-proxy-kubernetes (with the Kubernetes source, for the node DaemonSet),
## and bin/imds-proxy-workload-role (with the AWS SDK's credential providers, for --credentials=workload)
build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/imds-proxy ./cmd/imds-proxy
	$(GO) build -tags kubernetes -ldflags "-X main.version=$(VERSION)" -o $(BIN)/imds-proxy-kubernetes ./cmd/imds-proxy
	$(GO) build -tags workloadrole -ldflags "-X main.version=$(VERSION)" -o $(BIN)/imds-proxy-workload-role ./cmd/imds-proxy

# The IMDS mock the tests and the demo run as a real process.
$(BIN)/ec2-metadata-mock:
	GOBIN=$(BIN) $(GO) install $(AEMM_MODULE)

# A real kube-apiserver and etcd on loopback for the Kubernetes tests
# (internal/testutil/kube.go, which finds them through KUBE_APISERVER_BIN
# and ETCD_BIN). kube-apiserver is built from its module through the Go
# module proxy, once (5-7 minutes on 2 cores from empty Go caches; the
# caches make a rebuild after `make clean` quick); etcd is unpacked from
# Debian's etcd-server package, not installed (installing it would start a
# system etcd on :2379).
KUBE_VERSION   := v1.34.0
KUBE_APISERVER := $(BIN)/kube-apiserver-$(KUBE_VERSION)
ETCD           := $(BIN)/etcd

$(KUBE_APISERVER):
	GO=$(GO) nice ./internal/testutil/build-kube-apiserver.sh $(KUBE_VERSION) $@

$(ETCD):
	@mkdir -p $(BIN)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && \
	{ apt-get download etcd-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download etcd-server >/dev/null; }; } && \
	dpkg-deb -x etcd-server_*.deb root && install -m 0755 root/usr/bin/etcd $@ && echo "unpacked $$(ls etcd-server_*.deb) into $@"

$(BIN)/demo-client: $(shell find demo/client -name '*.go') go.mod
	$(GO) build -o $@ ./demo/client

## lint: gofmt and go vet
lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags kubernetes ./...
	$(GO) vet -tags workloadrole ./...
	$(GO) vet -tags kubernetes,workloadrole ./...

## deps: the system packages the tests need (as root; elsewhere the namespace tests skip): iptables and
## iproute2 for the namespace tests, openssl for deploy/kubernetes/webhook/gen-certs.sh and the
## kube-apiserver's certificates (internal/testutil/kube.go), docker.io
## (dockerd, containerd, runc; init script and systemd units left out, so nothing starts them) and
## busybox-static for the Docker tests (internal/testutil/docker.go), and Debian's prometheus for promtool
## (deploy/prometheus_test.go), and qemu-user-static for the arm64 tests
deps:
	@if [ "$$(id -u)" = 0 ] && ! { command -v iptables-legacy && command -v iptables-nft && command -v ip && command -v openssl; } >/dev/null; then \
		echo "installing iptables, iproute2 and openssl"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables iproute2 openssl >/dev/null; \
	fi
	@if [ "$$(id -u)" = 0 ] && ! { command -v dockerd && command -v containerd && command -v runc && \
		dpkg-query -W -f='$${db:Status-Status}\n' busybox-static | grep -qx installed; } >/dev/null 2>&1; then \
		echo "installing docker.io and busybox-static for the Docker tests (no daemon is started)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			-o Dpkg::Options::=--path-exclude=/etc/init.d/docker -o 'Dpkg::Options::=--path-exclude=/lib/systemd/system/docker.*' \
			-o Dpkg::Options::=--path-exclude=/lib/systemd/system/containerd.service docker.io busybox-static >/dev/null; \
	fi
	@if [ "$$(id -u)" = 0 ] && ! command -v qemu-aarch64-static >/dev/null; then \
		echo "installing qemu-user-static, which runs the arm64 tests (make test-arm64)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null; \
	fi
	@if [ "$$(id -u)" = 0 ] && ! command -v promtool >/dev/null; then \
		echo "installing Debian's prometheus for promtool, which tests deploy/prometheus (no daemon is started)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			-o Dpkg::Options::=--path-exclude=/etc/init.d/prometheus -o 'Dpkg::Options::=--path-exclude=/lib/systemd/system/prometheus*' \
			prometheus >/dev/null; \
	fi

# The AWS SDK for JavaScript v3, a client the e2e tests run (from the npm registry).
JSCLIENT := demo/jsclient
$(JSCLIENT)/node_modules/.installed: $(JSCLIENT)/package.json $(JSCLIENT)/package-lock.json
	@if ! command -v npm >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing nodejs and npm for the JavaScript SDK tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; \
	fi
	npm ci --prefix $(JSCLIENT) --no-audit --no-fund --loglevel=error
	@touch $@

## test: every test, with the race detector
test: deps lint $(BIN)/ec2-metadata-mock $(JSCLIENT)/node_modules/.installed $(KUBE_APISERVER) $(ETCD)
	AEMM_BIN=$(BIN)/ec2-metadata-mock KUBE_APISERVER_BIN=$(KUBE_APISERVER) ETCD_BIN=$(ETCD) \
		$(GO) test -tags kubernetes,workloadrole -race -count=1 -timeout 10m ./...
	@$(MAKE) --no-print-directory test-arm64

# The packages whose tests run as an arm64 binary under user-mode emulation:
# those that neither re-execute their own test binary (iptables) nor start
# processes into a cgroup (clone3, which qemu-user lacks).
ARM64_PACKAGES := ./token ./inject ./report ./webhook ./internal/serving ./doctor ./proxy

## test-arm64: the pure-Go packages' tests built for arm64 (Graviton) and run under qemu-aarch64-static
test-arm64: deps $(BIN)/ec2-metadata-mock
	@if ! command -v qemu-aarch64-static >/dev/null; then \
		if [ "$$CI" = true ]; then echo "qemu-aarch64-static is missing (make deps installs qemu-user-static as root)" >&2; exit 1; fi; \
		echo "qemu-aarch64-static is missing: skipping the arm64 tests"; exit 0; \
	fi; \
	AEMM_BIN=$(BIN)/ec2-metadata-mock GOARCH=arm64 $(GO) test -count=1 -timeout 10m -exec qemu-aarch64-static $(ARM64_PACKAGES) && \
	GOARCH=arm64 $(GO) test -count=1 -exec qemu-aarch64-static -run '^TestParseCgroup$$' ./internal/attribution

## demo: as root, the hop-limit problem and its fixes in network namespaces, with the AWS SDK
demo: deps $(BIN)/ec2-metadata-mock
	@if [ "$$(id -u)" != 0 ]; then echo "make demo builds network namespaces and needs root; running make demo-loopback instead"; \
		$(MAKE) --no-print-directory demo-loopback; exit; fi; \
	AEMM_BIN=$(BIN)/ec2-metadata-mock $(GO) test -count=1 -run '^TestDemoTable$$' -v ./e2e | grep -vE $(GO_TEST_NOISE)

## demo-loopback: the proxy in front of an IMDS mock on loopback (no root needed)
demo-loopback: build $(BIN)/ec2-metadata-mock $(BIN)/demo-client
	./demo/loopback.sh

## bench: the demo's measurements (as root), median of 9 runs each, then the load benchmarks
bench: deps $(BIN)/ec2-metadata-mock
	@if [ "$$(id -u)" = 0 ]; then \
		AEMM_BIN=$(BIN)/ec2-metadata-mock IMDS_PROXY_BENCH_RUNS=9 $(GO) test -count=1 -run '^TestDemoTable$$' -v ./e2e | grep -vE $(GO_TEST_NOISE); \
	else echo "the namespace table needs root; skipping it"; fi
	@$(MAKE) --no-print-directory bench-load
	$(GO) test -run '^$$' -bench . -benchtime 1s ./token ./proxy | grep -vE '^(goos|goarch|pkg|cpu):'

# The load benchmarks' metrics and tables (-v shows the tables), without go test's own lines.
BENCH_NOISE := '^(goos|goarch|pkg|cpu):|^Benchmark[^ ]*$$|^(PASS$$|ok )'
BENCH_LOAD  := AEMM_BIN=$(BIN)/ec2-metadata-mock $(GO) test -run '^$$' -v -timeout 10m ./bench

## bench-load: direct vs nginx vs imds-proxy under load, token PUTs, memory over a million mints, SDK credential bursts, the binary size and idle RSS (about 3 minutes; as root it installs nginx)
bench-load: $(BIN)/ec2-metadata-mock
	@if [ "$$(id -u)" = 0 ] && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then \
		echo "installing nginx (the load benchmark compares against it)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; \
	fi
	$(BENCH_LOAD) -bench 'MetadataGET|TokenPUT' -benchtime 4s | grep -vE $(BENCH_NOISE)
	$(BENCH_LOAD) -bench MintMemory -benchtime 1000000x | grep -vE $(BENCH_NOISE)
	$(BENCH_LOAD) -bench CredentialBurst -benchtime 1x | grep -vE $(BENCH_NOISE)
	$(BENCH_LOAD) -bench Footprint -benchtime 1x | grep -vE $(BENCH_NOISE)

## image: the container image for amd64 and arm64 (Graviton), with docker (engine running, BuildKit) or buildah:
## docker tags $(IMAGE)-amd64 and $(IMAGE)-arm64, buildah makes the manifest list $(IMAGE); the binaries are
## cross-compiled, and the base image's apt-get runs under the host's binfmt emulation for the other architecture
IMAGE ?= imds-proxy:$(VERSION)
IMAGE_PLATFORMS ?= linux/amd64 linux/arm64
image:
	@if docker info >/dev/null 2>&1; then \
		for platform in $(IMAGE_PLATFORMS); do \
			DOCKER_BUILDKIT=1 docker build --platform $$platform --build-arg VERSION=$(VERSION) -t $(IMAGE)-$${platform#linux/} . || exit 1; \
		done; \
	elif command -v buildah >/dev/null; then \
		buildah bud --platform $$(echo $(IMAGE_PLATFORMS) | tr ' ' ,) --manifest $(IMAGE) --build-arg VERSION=$(VERSION) .; \
	else echo "make image needs docker with a running engine, or buildah; neither is available here" >&2; exit 1; fi

clean:
	rm -rf $(BIN)
