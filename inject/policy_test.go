package inject

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/imds-proxy/imds-proxy/imdsapi"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	sigsyaml "sigs.k8s.io/yaml"
)

// policyCase is one pod of testdata/policy/pods.yaml with what to expect.
type policyCase struct {
	name    string
	doc     []byte
	pod     corev1.Pod
	outcome string // injected, skipped, violation or bypass
	says    string
	v1      string // the sidecar's --v1 afterwards, if it has one
}

func policyCases(t *testing.T) []policyCase {
	t.Helper()
	stream, err := os.ReadFile("testdata/policy/pods.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cases []policyCase
	for _, doc := range splitDocuments(stream) {
		c := policyCase{doc: doc}
		if err := sigsyaml.UnmarshalStrict(doc, &c.pod); err != nil {
			t.Fatalf("%v\n%s", err, doc)
		}
		a := c.pod.Annotations
		c.name, c.outcome, c.says, c.v1 = c.pod.Name, a["test.imds-proxy.io/outcome"], a["test.imds-proxy.io/says"], a["test.imds-proxy.io/v1"]
		cases = append(cases, c)
	}
	if len(cases) < 20 {
		t.Fatalf("%d pods in testdata/policy/pods.yaml, want every case", len(cases))
	}
	return cases
}

// floorOptions are the default sidecar under a block floor.
func floorOptions(on OnViolation, permitted ...string) Options {
	o := DefaultOptions()
	o.Policy = Policy{V1Floor: imdsapi.V1Block, OnViolation: on, OptOutNamespaces: permitted}
	return o
}

// want is the outcome of c in a mode: a violation is warned, denied, or
// skipped where the namespace is permitted; a bypass is denied, or warned
// (and the pod gets or keeps the sidecar) where the namespace is permitted.
func (c policyCase) want(o Options) Outcome {
	switch {
	case c.outcome != "violation" && c.outcome != "bypass":
		return Outcome(c.outcome)
	case o.Policy.Permits(c.pod.Namespace):
		if c.outcome == "bypass" {
			return Warned
		}
		return Skipped
	case o.Policy.Denies():
		return Denied
	}
	return Warned
}

// v1Options are the default sidecar with --v1=block and no floor given:
// the floor is then --v1, so they decide as floorOptions do.
func v1Options(on OnViolation) Options {
	o := DefaultOptions()
	o.V1, o.Policy.OnViolation = imdsapi.V1Block, on
	return o
}

// TestPolicy decides every pod of the shared fixtures in each mode, as the
// webhook (PodPatch) and as `inject k8s` (Kubernetes): the same outcome,
// the same explanation, the same sidecar at the same --v1.
func TestPolicy(t *testing.T) {
	modes := map[string]Options{
		"warn":          floorOptions(Warn),
		"deny":          floorOptions(Deny),
		"permitted":     floorOptions(Deny, "kube-system", "shop"),
		"v1-block-warn": v1Options(Warn),
		"v1-block-deny": v1Options(Deny),
	}
	for _, c := range policyCases(t) {
		for mode, o := range modes {
			t.Run(c.name+"/"+mode, func(t *testing.T) {
				want := c.want(o)
				a, err := PodPatch(podJSON(t, &c.pod), c.pod.Namespace, o)
				if err != nil {
					t.Fatal(err)
				}
				said := a.Reason + "\n" + strings.Join(a.Warnings, "\n")
				if a.Outcome != want || !strings.Contains(said, c.says) {
					t.Errorf("webhook: outcome %s, reason and warnings %q; want %s saying %q", a.Outcome, said, want, c.says)
				}
				wantPatch := want == Injected || c.outcome == "bypass" && want == Warned && !hasSidecar(c.pod) // injected, with a warning
				if (a.Patch != nil) != wantPatch {
					t.Errorf("webhook: patch %s for outcome %s", a.Patch, a.Outcome)
				}
				out, notes, err := Kubernetes(c.doc, o)
				if want == Denied {
					if err == nil || !strings.Contains(err.Error(), c.says) || !strings.Contains(err.Error(), "refused") {
						t.Errorf("inject k8s: error %v, want a refusal saying %q", err, c.says)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if joined := strings.Join(notes, "\n"); !strings.Contains(joined, c.says) || (c.says == "" && joined != "") {
					t.Errorf("inject k8s: notes %q, want them to say %q", notes, c.says)
				}
				var injected corev1.Pod
				if err := sigsyaml.UnmarshalStrict(out, &injected); err != nil {
					t.Fatal(err)
				}
				patched := &c.pod
				if a.Patch != nil {
					patched = applyPatch(t, &c.pod, a.Patch)
				}
				if !equality.Semantic.DeepEqual(patched.Spec, injected.Spec) {
					t.Errorf("webhook and inject k8s differ:\n%s", cmp.Diff(injected.Spec, patched.Spec))
				}
				if got := sidecarV1(injected); got != c.v1 && c.outcome != "violation" {
					t.Errorf("the sidecar's --v1 is %q, want %q", got, c.v1)
				}
			})
		}
	}
}

func hasSidecar(p corev1.Pod) bool {
	return slices.ContainsFunc(p.Spec.InitContainers, func(c corev1.Container) bool { return c.Name == ContainerName })
}

// sidecarV1 is the --v1 of the pod's sidecar, "" if it has none.
func sidecarV1(p corev1.Pod) string {
	for _, c := range p.Spec.InitContainers {
		if c.Name != ContainerName {
			continue
		}
		for _, a := range c.Args {
			if v, ok := strings.CutPrefix(a, "--v1="); ok {
				return v
			}
		}
	}
	return ""
}

// TestV1Order: policies rank by what they refuse, auto between warn and
// block, and a floor raises exactly the looser ones.
func TestV1Order(t *testing.T) {
	order := []imdsapi.V1Policy{imdsapi.V1Allow, imdsapi.V1Warn, imdsapi.V1Auto, imdsapi.V1Block}
	for i, floor := range order {
		pol := Policy{V1Floor: floor}
		for j, p := range order {
			if got, want := pol.raise(p), order[max(i, j)]; got != want {
				t.Errorf("floor %s raises %s to %s, want %s", floor, p, got, want)
			}
		}
		if !pol.looser("sometimes") {
			t.Errorf("floor %s: a policy it cannot rank is not looser", floor)
		}
	}
	if (Policy{}).looser(imdsapi.V1Allow) {
		t.Error("no floor: allow is looser")
	}
}

// TestPolicyValidate: bad policy flags are refused by name.
func TestPolicyValidate(t *testing.T) {
	for _, c := range []struct {
		pol  Policy
		says string
	}{
		{Policy{V1Floor: "sometimes"}, "--v1-floor"},
		{Policy{OnViolation: "ignore"}, "--on-violation"},
		{Policy{OptOutNamespaces: []string{"a b"}}, "--allow-opt-out-namespaces"},
		{Policy{OptOutNamespaces: []string{""}}, "--allow-opt-out-namespaces"},
	} {
		o := DefaultOptions()
		o.Policy = c.pol
		if err := o.Validate(); err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("%+v: %v, want an error naming %s", c.pol, err, c.says)
		}
	}
	o := floorOptions(Deny, "*")
	if err := o.Validate(); err != nil || !o.Policy.Permits("anything") {
		t.Errorf("* permits every namespace: %v", err)
	}
}

// TestExemptUIDIsTheOperators: the sidecar-init variant is the sidecar only
// with the UID the operator exempts (--exempt-uid), never one the pod's
// author chose; with none, no variant is.
func TestExemptUIDIsTheOperators(t *testing.T) {
	pods := map[string]policyCase{}
	for _, c := range policyCases(t) {
		pods[c.name] = c
	}
	for _, c := range []struct {
		uid     int64
		pod     string
		outcome Outcome
		says    string
	}{
		{1000, "sidecar-init-own-uid", Denied, "container app can become UID 1000, which the redirect exempts: it runs as 1000"},
		{1000, "sidecar-init", Denied, "its imds-proxy-rules container exempts UID 1337, not --exempt-uid=1000"},
		{0, "sidecar-init", Denied, "exempts UID 1337, not --exempt-uid=0"},
		{1337, "sidecar-init", Skipped, ""},
	} {
		o := floorOptions(Deny)
		o.ExemptUID = c.uid
		pod := pods[c.pod].pod
		a, err := PodPatch(podJSON(t, &pod), pod.Namespace, o)
		said := a.Reason + "\n" + strings.Join(a.Warnings, "\n")
		if err != nil || a.Outcome != c.outcome || !strings.Contains(said, c.says) {
			t.Errorf("--exempt-uid=%d, pod %s: %s saying %q, err %v; want %s saying %q", c.uid, c.pod, a.Outcome, said, err, c.outcome, c.says)
		}
	}
	o := DefaultOptions()
	if o.ExemptUID != 1337 {
		t.Errorf("default --exempt-uid %d, want 1337, the UID of deploy/kubernetes/sidecar-init", o.ExemptUID)
	}
	o.ExemptUID = -1
	if err := o.Validate(); err == nil || !strings.Contains(err.Error(), "--exempt-uid") {
		t.Errorf("--exempt-uid=-1: %v, want an error naming it", err)
	}
}
