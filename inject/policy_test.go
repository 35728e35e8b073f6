package inject

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/imds-proxy/imds-proxy/proxy"
)

// policyCase is one pod of testdata/policy/pods.yaml with what to expect.
type policyCase struct {
	name    string
	doc     []byte
	pod     corev1.Pod
	outcome string // injected, skipped, warned, or violation
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
	o.Policy = Policy{V1Floor: proxy.V1Block, OnViolation: on, OptOutNamespaces: permitted}
	return o
}

// want is the outcome of c in a mode: a violation is warned, denied, or
// skipped where the namespace is permitted.
func (c policyCase) want(o Options) Outcome {
	if c.outcome != "violation" {
		return Outcome(c.outcome)
	}
	switch {
	case o.Policy.Permits(c.pod.Namespace):
		return Skipped
	case o.Policy.Denies():
		return Denied
	}
	return Warned
}

// TestPolicy decides every pod of the shared fixtures in each mode, as the
// webhook (PodPatch) and as `inject k8s` (Kubernetes): the same outcome,
// the same explanation, the same sidecar at the same --v1.
func TestPolicy(t *testing.T) {
	modes := map[string]Options{
		"warn":      floorOptions(Warn),
		"deny":      floorOptions(Deny),
		"permitted": floorOptions(Deny, "kube-system", "shop"),
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
				wantPatch := want == Injected || c.outcome == "warned" && !hasSidecar(c.pod) // injected, with a warning
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
	order := []proxy.V1Policy{proxy.V1Allow, proxy.V1Warn, proxy.V1Auto, proxy.V1Block}
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
	if (Policy{}).looser(proxy.V1Allow) {
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
