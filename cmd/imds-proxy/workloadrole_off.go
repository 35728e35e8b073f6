//go:build !workloadrole

package main

import (
	"context"
	"errors"

	"github.com/imds-proxy/imds-proxy/proxy"
)

// workloadRole refuses --credentials=workload: the AWS SDK would cost every
// sidecar about 2.6 MB of binary and 2.7 MiB of RSS, so it is only in the
// build with the workloadrole tag (imds-proxy-workload-role in the image),
// which the injectors run for the pods and tasks that ask for it.
func workloadRole(context.Context, string) (proxy.RoleSource, error) {
	return nil, errors.New("this imds-proxy is built without the AWS SDK's credential providers; " +
		"run /usr/local/bin/imds-proxy-workload-role (beside it in the image), or build with -tags workloadrole")
}
