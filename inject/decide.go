package inject

import (
	"fmt"
	"slices"
	"strings"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// Outcome is what the decision makes of a pod, and the result label of the
// webhook's imds_proxy_webhook_admissions_total.
type Outcome string

// The outcomes.
const (
	// Injected: the pod gets the sidecar, or its own sidecar's --v1 is
	// raised to the floor.
	Injected Outcome = "injected"
	// Skipped: the pod has the sidecar already, or may run without it.
	Skipped Outcome = "skipped"
	// Warned: the pod is admitted although it may reach IMDS around the
	// proxy: without the sidecar against the policy, or with a container
	// that can bypass it.
	Warned Outcome = "warned"
	// Denied: the pod would run without the sidecar, or with a container
	// that can bypass it, against the policy, which says to refuse it.
	Denied Outcome = "denied"
)

// decision is the one injection decision of the CLI and the webhook.
type decision struct {
	outcome  Outcome
	inject   *Options // add the sidecar with these options
	raise    *raise   // or raise the pod's own sidecar's --v1
	reason   string   // why the pod gets no sidecar, or is refused
	warnings []string
}

// raise replaces an existing sidecar's --v1 argument.
type raise struct {
	container, arg int
	value          string
}

// decide decides for a pod in namespace. A pod gets the sidecar unless it
// has it, opts out, uses the host network or clashes with it (a volume of
// its name, a container port of its ports: patched, the API server would
// refuse it). A pod that has the sidecar keeps it, its --v1 raised to the
// floor, unless it uses the host network or clashes with it. Each of these
// but having the sidecar is a violation outside the namespaces the policy
// permits, and so is a container named like the sidecar that is not it, and
// a container that could bypass the sidecar.
func decide(meta podMeta, spec *podSpec, namespace string, o Options) decision {
	e, found, why := recognise(spec, o)
	kept := found && why == ""
	var own []int     // the init containers of the pod's own sidecar
	var exempt *int64 // the UID its rules let through
	if kept {
		own, exempt = e.containers(), e.exemptUID
	}
	var reason string
	switch {
	case found && !kept:
		reason = "container " + ContainerName + " is not the sidecar (" + why + "): rename or remove it"
	case !kept && (meta.Annotations[InjectKey] == Disabled || meta.Labels[InjectKey] == Disabled):
		// A pod that has the sidecar keeps it: opting out changes nothing.
		reason = "opted out (" + InjectKey + ": " + Disabled + ")"
	case spec.HostNetwork:
		// A sidecar the pod brought would redirect the node's traffic just
		// as an injected one would.
		reason = "hostNetwork: a sidecar would redirect the whole node's IMDS traffic, and the node agent redirects none of it"
	default:
		reason = clashes(spec, o, own)
	}
	if reason != "" {
		return o.Policy.violation(reason, namespace)
	}
	var d decision
	if kept {
		d = decideExisting(e, o)
		asked, _ := o.forPod(meta, spec)
		if note := otherRole(o.withCredentials(spec.InitContainers[e.index].Args, nil), asked); note != "" {
			d.warnings = append(d.warnings, note)
		}
	} else {
		podOptions, warnings := o.forPod(meta, spec)
		d = decision{outcome: Injected, inject: &podOptions, warnings: warnings}
	}
	bypass := bypasses(spec, exempt, own...)
	if len(bypass) == 0 {
		return d
	}
	// A container that can bypass the sidecar makes it as good as absent:
	// a violation like running without it. Where the pod is admitted it
	// still gets (or keeps) the sidecar, which holds against the others.
	if v := o.Policy.violation(strings.Join(bypass, "; "), namespace); v.outcome == Denied {
		return v
	}
	d.outcome, d.warnings = Warned, append(d.warnings, bypass...)
	return d
}

// violation is the decision for a pod that would get around the sidecar
// for reason: skipped where the namespace is permitted, else refused or
// warned about as the policy says.
func (pol Policy) violation(reason, namespace string) decision {
	if pol.Permits(namespace) {
		return decision{outcome: Skipped, reason: reason}
	}
	reason += "; " + pol.unpermitted(namespace)
	if pol.Denies() {
		return decision{outcome: Denied, reason: reason}
	}
	return decision{outcome: Warned, reason: reason}
}

// decideExisting raises the --v1 of the pod's own sidecar to the floor.
func decideExisting(e existing, o Options) decision {
	d := decision{outcome: Skipped} // no reason: nothing to tell the operator
	if o.Policy.looser(e.v1) {
		d.outcome = Injected
		d.raise = &raise{container: e.index, arg: e.v1Arg, value: "--v1=" + string(o.Policy.V1Floor)}
		d.warnings = append(d.warnings, fmt.Sprintf("its %s sidecar's --v1=%s is looser than the floor (--v1-floor=%s); it runs with --v1=%s",
			ContainerName, e.v1, o.Policy.V1Floor, o.Policy.V1Floor))
	}
	return d
}

// clashes names what in spec the sidecar would collide with, or "". own
// are the init containers of a sidecar the pod already has: their ports,
// and the volume recognise found equal to RunVolume, are the sidecar's.
func clashes(spec *podSpec, o Options, own []int) string {
	if len(own) == 0 && slices.ContainsFunc(spec.Volumes, func(v podVolume) bool { return v.Name == RunVolumeName }) {
		return "it already has a volume named " + RunVolumeName + ", the sidecar's: rename it"
	}
	check := func(c podContainer) string {
		for _, p := range c.Ports {
			if int(p.ContainerPort) == o.Port || int(p.ContainerPort) == o.MetricsPort {
				return fmt.Sprintf("container %s uses port %d, which the sidecar needs (it uses %d and %d: --port, --metrics-port)",
					c.Name, p.ContainerPort, o.Port, o.MetricsPort)
			}
		}
		return ""
	}
	for i, c := range spec.InitContainers {
		if why := check(c); why != "" && !slices.Contains(own, i) {
			return why
		}
	}
	for _, c := range spec.Containers {
		if why := check(c); why != "" {
			return why
		}
	}
	return ""
}

// forPod applies the pod's annotations to o. V1Key, within the floor: the
// annotation may choose any policy the floor admits, looser or stricter
// than o.V1. One looser than the floor gets the floor, one that is not a
// policy gets o.V1 (raised to the floor), and a warning says so.
// CredentialsKey: "workload" gives the sidecar the pod's own role, with the
// credential source of its app containers.
func (o Options) forPod(meta podMeta, spec *podSpec) (Options, []string) {
	o.V1 = o.Policy.raise(o.V1)
	var warnings []string
	switch value, ok := meta.Annotations[imdsapi.CredentialsKey]; {
	case !ok:
	case value == string(imdsapi.CredentialsWorkload):
		var why string
		o.Credentials = imdsapi.CredentialsWorkload
		if o.source, why = credentialSourceOf(spec); why != "" {
			warnings = append(warnings, fmt.Sprintf("annotation %s: %s: the sidecar takes nothing from it, and has a source only if "+
				"the EKS webhook adds one to it", imdsapi.CredentialsKey, why))
		}
	case value != string(imdsapi.CredentialsInstance):
		warnings = append(warnings, fmt.Sprintf("annotation %s: %q is neither instance nor workload; the sidecar serves the instance's role",
			imdsapi.CredentialsKey, value))
	}
	o, v1Warnings := o.forPodV1(meta)
	return o, append(warnings, v1Warnings...)
}

// forPodV1 applies the pod's V1Key annotation to o, within the floor.
func (o Options) forPodV1(meta podMeta) (Options, []string) {
	value, ok := meta.Annotations[V1Key]
	if !ok {
		return o, nil
	}
	policy, err := imdsapi.ParseV1Policy(value)
	switch {
	case err != nil:
		return o, []string{fmt.Sprintf("annotation %s: %v; the sidecar uses --v1=%s", V1Key, err, o.V1)}
	case o.Policy.looser(policy):
		o.V1 = o.Policy.V1Floor
		return o, []string{fmt.Sprintf("annotation %s: %s is looser than the floor; the sidecar uses --v1=%s", V1Key, policy, o.V1)}
	}
	o.V1 = policy
	return o, nil
}
