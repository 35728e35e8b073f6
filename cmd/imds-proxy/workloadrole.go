//go:build workloadrole

package main

import (
	"context"

	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/workloadrole"
)

// workloadRole is --credentials=workload's role: the one the sidecar's
// environment names, through the AWS SDK's own resolution.
func workloadRole(ctx context.Context, arn string) (proxy.RoleSource, error) {
	return workloadrole.FromEnvironment(ctx, arn)
}
