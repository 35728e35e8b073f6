//go:build kubernetes

package main

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/imds-proxy/imds-proxy/report"
	"github.com/imds-proxy/imds-proxy/workload"
)

// kubernetesSource is the Kubernetes source of --node-name, with the
// credentials of --kubeconfig or, by default, the pod's service account.
func kubernetesSource(f *serveFlags, log *zap.Logger) (workload.Source, error) {
	var cfg *rest.Config
	var err error
	if f.kubeconfig != "" {
		if cfg, err = clientcmd.BuildConfigFromFlags("", f.kubeconfig); err != nil {
			return nil, fmt.Errorf("--kubeconfig: %w", err)
		}
	} else if cfg, err = rest.InClusterConfig(); err != nil {
		return nil, fmt.Errorf("--node-name needs the Kubernetes API: %w (mount the service account's token, or name a --kubeconfig)", err)
	}
	return workload.NewKubernetes(workload.KubernetesConfig{REST: cfg, NodeName: f.nodeName, Log: log})
}

// kubernetesReport is report --kubeconfig: the inventory of the proxies'
// /v1-callers in the cluster that kubeconfig names.
func kubernetesReport(ctx context.Context, kubeconfig string, at time.Time) (*report.Inventory, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("--kubeconfig: %w", err)
	}
	return report.FromKubernetes(ctx, cfg, at)
}
