package inject

import (
	"encoding/json"
	"slices"
	"testing"

	jsonpatch "github.com/evanphx/json-patch/v5"
	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	sigsyaml "sigs.k8s.io/yaml"
)

// TestPodPatchMatchesTheManifestInjection applies the webhook's JSON Patch
// (with a real RFC 6902 implementation) and compares the pod with what
// `inject k8s` makes of the same pod: the webhook and the CLI add the same
// sidecar, whatever the pod already has.
func TestPodPatchMatchesTheManifestInjection(t *testing.T) {
	pods := map[string]string{
		"bare": "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\nspec:\n  containers:\n    - name: app\n      image: x\n",
		"init and volumes": "apiVersion: v1\nkind: Pod\nmetadata:\n  name: b\nspec:\n  initContainers:\n    - name: setup\n      image: y\n" +
			"  containers:\n    - name: app\n      image: x\n  volumes:\n    - name: v\n      emptyDir: {}\n",
		"block annotation": "apiVersion: v1\nkind: Pod\nmetadata:\n  name: c\n  annotations:\n    imds-proxy.io/v1: block\nspec:\n  containers:\n    - name: app\n      image: x\n",
		"workload role, IRSA": "apiVersion: v1\nkind: Pod\nmetadata:\n  name: d\n  annotations:\n    imds-proxy.io/credentials: workload\nspec:\n  containers:\n" +
			"    - name: app\n      image: x\n      env:\n        - name: AWS_ROLE_ARN\n          value: arn:aws:iam::111122223333:role/d\n" +
			"        - name: AWS_WEB_IDENTITY_TOKEN_FILE\n          value: /var/run/secrets/eks.amazonaws.com/serviceaccount/token\n" +
			"      volumeMounts:\n        - name: aws-iam-token\n          readOnly: true\n          mountPath: /var/run/secrets/eks.amazonaws.com/serviceaccount\n" +
			"  volumes:\n    - name: aws-iam-token\n      projected:\n        sources:\n          - serviceAccountToken: {audience: sts.amazonaws.com, path: token}\n",
	}
	for name, manifest := range pods {
		t.Run(name, func(t *testing.T) {
			var pod corev1.Pod
			if err := sigsyaml.UnmarshalStrict([]byte(manifest), &pod); err != nil {
				t.Fatal(err)
			}
			a, err := PodPatch(podJSON(t, &pod), "shop", DefaultOptions())
			if err != nil || a.Patch == nil || a.Outcome != Injected {
				t.Fatalf("no patch: %+v %v", a, err)
			}
			patched := applyPatch(t, &pod, a.Patch)
			injected, _, err := Kubernetes([]byte(manifest), DefaultOptions())
			if err != nil {
				t.Fatal(err)
			}
			var want corev1.Pod
			if err := sigsyaml.UnmarshalStrict(injected, &want); err != nil {
				t.Fatal(err)
			}
			if !equality.Semantic.DeepEqual(patched.Spec, want.Spec) {
				t.Errorf("webhook and inject k8s differ:\n%s", cmp.Diff(want.Spec, patched.Spec))
			}
			if again, _ := PodPatch(podJSON(t, patched), "shop", DefaultOptions()); again.Patch != nil || again.Outcome != Skipped {
				t.Errorf("a patched pod is patched again: %+v", again)
			}
		})
	}
}

func applyPatch(t *testing.T, pod *corev1.Pod, patch []byte) *corev1.Pod {
	t.Helper()
	decoded, err := jsonpatch.DecodePatch(patch)
	if err != nil {
		t.Fatalf("not an RFC 6902 patch: %v\n%s", err, patch)
	}
	original, _ := json.Marshal(pod)
	out, err := decoded.Apply(original)
	if err != nil {
		t.Fatalf("patch does not apply: %v\n%s", err, patch)
	}
	var patched corev1.Pod
	if err := json.Unmarshal(out, &patched); err != nil {
		t.Fatal(err)
	}
	return &patched
}

// TestPodPatchSkips: opted-out and hostNetwork pods get no patch and a
// reason, as violations (no namespace permits them by default); a bad
// policy annotation gets the default and a warning.
func TestPodPatchSkips(t *testing.T) {
	optOut := corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "a"}}}}
	optOut.Annotations = map[string]string{InjectKey: Disabled}
	optOutLabel := corev1.Pod{Spec: optOut.Spec}
	optOutLabel.Labels = map[string]string{InjectKey: Disabled}
	host := corev1.Pod{Spec: corev1.PodSpec{HostNetwork: true, Containers: []corev1.Container{{Name: "a"}}}}
	for name, pod := range map[string]corev1.Pod{"annotation": optOut, "label": optOutLabel, "hostNetwork": host} {
		if a, err := PodPatch(podJSON(t, &pod), "shop", DefaultOptions()); a.Patch != nil || a.Reason == "" || a.Outcome != Warned || err != nil {
			t.Errorf("%s: %+v, err %v; want no patch, a reason and the outcome warned", name, a, err)
		}
	}
	typo := corev1.Pod{Spec: optOut.Spec}
	typo.Annotations = map[string]string{V1Key: "blokc"}
	a, err := PodPatch(podJSON(t, &typo), "shop", DefaultOptions())
	if err != nil || a.Patch == nil || len(a.Warnings) != 1 {
		t.Fatalf("typo annotation: %+v, err %v", a, err)
	}
	if got := applyPatch(t, &typo, a.Patch).Spec.InitContainers[0].Args; !slices.Contains(got, "--v1=auto") {
		t.Errorf("typo annotation: sidecar args %q, want the default policy", got)
	}
	if _, err := PodPatch([]byte(`{"spec":{"containers":5}}`), "shop", DefaultOptions()); err == nil {
		t.Error("a pod that does not decode: no error")
	}
}

func podJSON(t *testing.T, pod *corev1.Pod) []byte {
	t.Helper()
	data, err := json.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	return data
}
