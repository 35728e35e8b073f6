package inject

import (
	"fmt"
	"slices"
	"strings"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// OnViolation says what becomes of a pod that would escape the sidecar.
type OnViolation string

// The answers to a violation.
const (
	// Warn admits the pod with an admission warning (inject: a note).
	Warn OnViolation = "warn"
	// Deny refuses the pod (inject: an error).
	Deny OnViolation = "deny"
)

// Policy is what the operator enforces over a pod's own choices. Its zero
// value takes Options.V1 as the IMDSv1 floor, warns about violations and
// lets no namespace run pods without the sidecar.
type Policy struct {
	// V1Floor is the loosest IMDSv1 policy a sidecar may get. A pod's V1Key
	// annotation, an existing sidecar's --v1 and Options.V1 below it are
	// raised to it. Empty: Options.V1 is the floor, so that a pod can only
	// tighten what the operator chose (V1Allow lets pods choose any).
	V1Floor imdsapi.V1Policy
	// OnViolation is Warn (or empty) or Deny.
	OnViolation OnViolation
	// OptOutNamespaces are the namespaces whose pods may run without the
	// sidecar; "*" stands for every namespace.
	OptOutNamespaces []string
}

// looser says whether p refuses less than the floor. Without a floor
// (Options.withFloor gives every decision one) nothing is looser; a policy
// without a rank counts as looser.
func (pol Policy) looser(p imdsapi.V1Policy) bool {
	return pol.V1Floor != "" && imdsapi.AtLeast(p, pol.V1Floor) != p
}

// raise is p, or the floor where p is looser.
func (pol Policy) raise(p imdsapi.V1Policy) imdsapi.V1Policy {
	if pol.looser(p) {
		return pol.V1Floor
	}
	return p
}

// Permits says whether pods in namespace may run without the sidecar.
func (pol Policy) Permits(namespace string) bool {
	return slices.Contains(pol.OptOutNamespaces, "*") || slices.Contains(pol.OptOutNamespaces, namespace)
}

// Denies says whether a violation refuses the pod.
func (pol Policy) Denies() bool { return pol.OnViolation == Deny }

// validate names the flag that set a bad value.
func (pol Policy) validate() error {
	if pol.V1Floor != "" {
		if _, err := imdsapi.ParseV1Policy(string(pol.V1Floor)); err != nil {
			return fmt.Errorf("--v1-floor: %w", err)
		}
		if _, ok := pol.V1Floor.Rank(); !ok {
			return fmt.Errorf("--v1-floor %s: imds-proxy inject cannot tell how strict it is", pol.V1Floor)
		}
	}
	switch pol.OnViolation {
	case "", Warn, Deny:
	default:
		return fmt.Errorf("--on-violation %q: want warn or deny", pol.OnViolation)
	}
	for _, ns := range pol.OptOutNamespaces {
		if ns == "" || strings.ContainsAny(ns, ", ") {
			return fmt.Errorf("--allow-opt-out-namespaces: %q is not a namespace name (want names separated by commas, or *)", ns)
		}
	}
	return nil
}

// unpermitted says that namespace may not run pods without the sidecar,
// for messages.
func (pol Policy) unpermitted(namespace string) string {
	if namespace == "" {
		return "the manifest names no namespace for --allow-opt-out-namespaces"
	}
	return fmt.Sprintf("namespace %q is not in --allow-opt-out-namespaces", namespace)
}
