package inject

import (
	"fmt"

	"github.com/imds-proxy/imds-proxy/proxy"
)

// skip says why a pod gets no sidecar; the zero value means inject.
type skip struct {
	reason string
	quiet  bool // already injected: nothing to tell the operator
}

// decide is the one injection decision of the CLI and the webhook. A pod the
// sidecar would clash with (a volume of its name, a container port of its
// ports) is skipped: patched, the API server would refuse it.
func decide(meta podMeta, spec *podSpec, o Options) skip {
	if hasSidecar(spec) {
		return skip{reason: "already has the " + ContainerName + " container", quiet: true}
	}
	if meta.Annotations[InjectKey] == Disabled || meta.Labels[InjectKey] == Disabled {
		return skip{reason: "opted out (" + InjectKey + ": " + Disabled + ")"}
	}
	if clash := clashes(spec, o); clash != "" {
		return skip{reason: clash}
	}
	if spec.HostNetwork {
		return skip{reason: "hostNetwork pods share the node's network namespace, where a sidecar's redirect " +
			"would capture the whole node's IMDS traffic; run the node agent (imds-proxy node) for them"}
	}
	return skip{}
}

// clashes names what in spec the sidecar would collide with, or "".
func clashes(spec *podSpec, o Options) string {
	for _, v := range spec.Volumes {
		if v.Name == RunVolumeName {
			return "it already has a volume named " + RunVolumeName
		}
	}
	for _, list := range [][]namedContainer{spec.InitContainers, spec.Containers} {
		for _, c := range list {
			for _, p := range c.Ports {
				if int(p.ContainerPort) == o.Port || int(p.ContainerPort) == o.MetricsPort {
					return fmt.Sprintf("container %s uses port %d, which the sidecar needs (choose others with --port and --metrics-port)", c.Name, p.ContainerPort)
				}
			}
		}
	}
	return ""
}

func hasSidecar(spec *podSpec) bool {
	for _, list := range [][]namedContainer{spec.InitContainers, spec.Containers} {
		for _, c := range list {
			if c.Name == ContainerName {
				return true
			}
		}
	}
	return false
}

// forPod applies the pod's V1Key annotation to o. A value that is not a
// policy leaves o as it is, and the warning says so.
func (o Options) forPod(meta podMeta) (Options, string) {
	value, ok := meta.Annotations[V1Key]
	if !ok {
		return o, ""
	}
	policy, err := proxy.ParseV1Policy(value)
	if err != nil {
		return o, fmt.Sprintf("annotation %s: %v; the sidecar uses --v1=%s", V1Key, err, o.V1)
	}
	o.V1 = policy
	return o, ""
}
