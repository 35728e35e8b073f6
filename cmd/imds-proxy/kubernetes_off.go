//go:build !kubernetes

package main

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/report"
	"github.com/imds-proxy/imds-proxy/workload"
)

// kubernetesSource refuses --node-name: the Kubernetes client would cost
// every sidecar about 4.5 MB of binary and 4 MB of RSS, so it is only in
// the build with the kubernetes tag (imds-proxy-kubernetes in the image),
// which the node DaemonSet runs.
func kubernetesSource(*serveFlags, *zap.Logger) (workload.Source, error) {
	return nil, errors.New("--node-name: this imds-proxy is built without the Kubernetes source; " +
		"run /usr/local/bin/imds-proxy-kubernetes (beside it in the image), or build with -tags kubernetes")
}

// kubernetesReport refuses report --kubeconfig, for the same reason.
func kubernetesReport(context.Context, string, time.Time) (*report.Inventory, error) {
	return nil, errors.New("--kubeconfig: this imds-proxy is built without the Kubernetes client; " +
		"run imds-proxy-kubernetes (beside it in the image), or build with -tags kubernetes")
}
