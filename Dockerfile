# Multi-stage build of a static imds-proxy binary. The runtime image gains
# iptables (nft and legacy) and a fixed non-root user with the deployment work.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/imds-proxy ./cmd/imds-proxy

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/imds-proxy /usr/local/bin/imds-proxy
ENTRYPOINT ["/usr/local/bin/imds-proxy"]
CMD ["sidecar"]
