# imds-proxy image: a static binary on a small Debian base that carries
# iptables and ip6tables with both the nft and legacy backends, so that
# --iptables-backend auto matches whatever the host uses.
# The build stage runs on the builder's own platform and cross-compiles for
# the target's (amd64, or arm64 for Graviton): pure Go, no emulation.
FROM --platform=$BUILDPLATFORM golang:1.26-bookworm AS build
# Set by BuildKit and buildah from --platform; empty (the host's) otherwise.
ARG TARGETOS TARGETARCH
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/imds-proxy ./cmd/imds-proxy
# The node DaemonSet's build: with the Kubernetes source (--node-name), whose
# client would cost every sidecar about 4.5 MB of binary and 4 MB of RSS.
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH go build -tags kubernetes -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/imds-proxy-kubernetes ./cmd/imds-proxy
# The build for sidecars that serve the pod's or task's own role
# (--credentials=workload), with the AWS SDK's credential providers, which
# would cost every other sidecar about 2.6 MB of binary and 2.7 MiB of RSS.
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH go build -tags workloadrole -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/imds-proxy-workload-role ./cmd/imds-proxy

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/imds-proxy /out/imds-proxy-kubernetes /out/imds-proxy-workload-role /usr/local/bin/
# A fixed non-root UID: the unprivileged proxy of the init-container setup,
# whose rules exempt it with `rules install --exempt-uid 1337 --exempt-mark 0`.
# Shapes where the proxy itself installs rules (native sidecar, node agent)
# run it as root with only the NET_ADMIN and NET_RAW capabilities (NET_RAW:
# iptables-legacy opens a raw socket).
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/imds-proxy"]
CMD ["sidecar"]
