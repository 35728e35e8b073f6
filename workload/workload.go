// Package workload tells a node agent which workload a container belongs
// to, from the sources each platform already has: the Kubernetes API (the
// pods of this node), the ECS agent's introspection API, and the Docker
// Engine API. A source that cannot be reached degrades to what is known;
// no lookup ever waits on the network.
package workload

import (
	"context"
	"fmt"
	"strings"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/attribution"
)

// The keys of the workload settings imds-proxy reads: pod and namespace
// annotations on Kubernetes, container labels on ECS and Docker.
const (
	// SettingsPrefix prefixes every key of a workload's Settings: the
	// annotations and labels that are imds-proxy's.
	SettingsPrefix = "imds-proxy.io/"
	// V1Key sets the IMDSv1 policy of the workload (allow, warn, auto or
	// block), as it sets an injected sidecar's.
	V1Key = imdsapi.V1Key
)

// Own identities a workload can have instead of the node's role.
const (
	IdentityIRSA        = "irsa"         // a service account annotated eks.amazonaws.com/role-arn
	IdentityPodIdentity = "pod-identity" // EKS Pod Identity
	IdentityTaskRole    = "task-role"    // an ECS task role
)

// Workload is what the node knows about the workload behind a container.
// Every field is "" where its source does not tell.
type Workload struct {
	// Platform is the source that knew it: "kubernetes", "ecs" or "docker".
	Platform string `json:"platform,omitempty"`
	// Namespace is the Kubernetes namespace, or the ECS cluster.
	Namespace string `json:"namespace,omitempty"`
	// Name is the workload: the pod's top owner as "Deployment/web" (a
	// bare pod is "Pod/<name>"), the ECS task definition as
	// "family:revision", or the Docker container's name.
	Name string `json:"workload,omitempty"`
	// Pod is the Kubernetes pod's name, or the ECS task's ARN.
	Pod string `json:"pod,omitempty"`
	// Container is the container's name in its pod or task.
	Container string `json:"container,omitempty"`
	// ServiceAccount is the pod's Kubernetes service account.
	ServiceAccount string `json:"service_account,omitempty"`
	// Image is the container's image, where the source tells it.
	Image string `json:"image,omitempty"`
	// OwnIdentity is the AWS identity the workload has instead of the
	// node's role: IdentityIRSA, IdentityPodIdentity, IdentityTaskRole.
	OwnIdentity string `json:"own_identity,omitempty"`
	// Settings are the workload's imds-proxy.io/* settings: its pod's
	// annotations over its namespace's on Kubernetes, its container's
	// labels on ECS and Docker.
	Settings map[string]string `json:"-"`
}

// Known says whether a source knew the workload.
func (w Workload) Known() bool { return w.Platform != "" }

// V1Policy is the workload's own IMDSv1 policy (V1Key), if it sets one.
// A value that is no policy is an error, for the log.
func (w Workload) V1Policy() (policy imdsapi.V1Policy, set bool, err error) {
	value, ok := w.Settings[V1Key]
	if !ok {
		return "", false, nil
	}
	if policy, err = imdsapi.ParseV1Policy(value); err != nil {
		return "", false, fmt.Errorf("%s of %s: %w", V1Key, w, err)
	}
	return policy, true, nil
}

// String names the workload for logs: "kubernetes team-a/Deployment/web".
func (w Workload) String() string {
	if !w.Known() {
		return "unknown workload"
	}
	return w.Platform + " " + w.Namespace + "/" + w.Name
}

// Source knows the workloads of one platform on this node.
type Source interface {
	// Lookup returns the workload of container c if the source knows it.
	// It answers from what the source holds and never waits on the network.
	Lookup(c attribution.Container) (Workload, bool)
	// Run keeps what the source holds current until ctx ends.
	Run(ctx context.Context)
}

// settings keeps the imds-proxy.io/* keys of annotations or labels, each
// map's over those before it (a pod's over its namespace's); nil where
// there are none.
func settings(layers ...map[string]string) map[string]string {
	var out map[string]string
	for _, layer := range layers {
		for k, v := range layer {
			if strings.HasPrefix(k, SettingsPrefix) {
				if out == nil {
					out = map[string]string{}
				}
				out[k] = v
			}
		}
	}
	return out
}
