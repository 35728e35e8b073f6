package inject

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/imds-proxy/imds-proxy/imdsapi"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	sigsyaml "sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// golden compares got with testdata/<name>, or rewrites it with -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(want), string(got)); diff != "" {
		t.Errorf("%s differs (-want +got; go test ./inject -update rewrites it):\n%s", path, diff)
	}
}

// TestKubernetesGolden injects each workload kind and compares with the
// golden output, whose notes are in a .notes file next to it; injecting the
// output again changes nothing.
func TestKubernetesGolden(t *testing.T) {
	inputs, _ := filepath.Glob("testdata/kubernetes/*.yaml")
	if len(inputs) < 8 {
		t.Fatalf("found %d inputs, want one per workload kind and mixed.yaml", len(inputs))
	}
	for _, input := range inputs {
		name := strings.TrimSuffix(filepath.Base(input), ".yaml")
		t.Run(name, func(t *testing.T) {
			in, err := os.ReadFile(input)
			if err != nil {
				t.Fatal(err)
			}
			out, notes, err := Kubernetes(in, DefaultOptions())
			if err != nil {
				t.Fatal(err)
			}
			golden(t, "kubernetes/golden/"+name+".yaml", out)
			golden(t, "kubernetes/golden/"+name+".notes", []byte(strings.Join(notes, "\n")+"\n"))
			again, _, err := Kubernetes(out, DefaultOptions())
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(again, out) {
				t.Errorf("injecting twice changed the output:\n%s", cmp.Diff(string(out), string(again)))
			}
		})
	}
}

// TestKubernetesKeepsTheWorkload decodes every injected document strictly
// into its API type and checks that the pod spec is the input's plus
// exactly the sidecar (first init container) and its volume (last).
func TestKubernetesKeepsTheWorkload(t *testing.T) {
	for _, name := range []string{"pod", "deployment", "statefulset", "daemonset", "replicaset", "job", "cronjob"} {
		t.Run(name, func(t *testing.T) {
			in, err := os.ReadFile("testdata/kubernetes/" + name + ".yaml")
			if err != nil {
				t.Fatal(err)
			}
			out, _, err := Kubernetes(in, DefaultOptions())
			if err != nil {
				t.Fatal(err)
			}
			before, after := podSpecs(t, in), podSpecs(t, out)
			for i := range before {
				if before[i].HostNetwork {
					if !equality.Semantic.DeepEqual(before[i], after[i]) {
						t.Errorf("document %d: a hostNetwork pod changed", i+1)
					}
					continue
				}
				checkInjected(t, before[i], after[i], name == "pod")
			}
		})
	}
}

func checkInjected(t *testing.T, before, after corev1.PodSpec, blockAnnotated bool) {
	t.Helper()
	want := DefaultOptions()
	if blockAnnotated {
		want.V1 = imdsapi.V1Block // pod.yaml carries imds-proxy.io/v1: block
	}
	sidecar := asAPI[corev1.Container](t, Container(want))
	if len(after.InitContainers) == 0 || !equality.Semantic.DeepEqual(after.InitContainers[0], sidecar) {
		t.Fatalf("first init container is not the sidecar:\n%s", cmp.Diff(sidecar, first(after.InitContainers)))
	}
	if last := after.Volumes[len(after.Volumes)-1]; !equality.Semantic.DeepEqual(last, asAPI[corev1.Volume](t, RunVolume())) {
		t.Errorf("last volume is %+v, want the sidecar's", last)
	}
	after.InitContainers = after.InitContainers[1:]
	after.Volumes = after.Volumes[:len(after.Volumes)-1]
	if len(after.InitContainers) == 0 {
		after.InitContainers = nil
	}
	if len(after.Volumes) == 0 {
		after.Volumes = nil
	}
	if !equality.Semantic.DeepEqual(before, after) {
		t.Errorf("injection changed more than the sidecar:\n%s", cmp.Diff(before, after))
	}
}

func first(c []corev1.Container) corev1.Container {
	if len(c) == 0 {
		return corev1.Container{}
	}
	return c[0]
}

// podSpecs decodes each document of a stream strictly into its workload
// type and returns the pod specs.
func podSpecs(t *testing.T, stream []byte) []corev1.PodSpec {
	t.Helper()
	var specs []corev1.PodSpec
	for _, doc := range splitDocuments(stream) {
		var head struct{ Kind string }
		if err := sigsyaml.Unmarshal(doc, &head); err != nil || templatePaths[head.Kind] == nil {
			continue
		}
		spec, err := decodeStrict(head.Kind, doc)
		if err != nil {
			t.Fatalf("%s does not decode strictly: %v\n%s", head.Kind, err, doc)
		}
		specs = append(specs, spec)
	}
	return specs
}

func decodeStrict(kind string, doc []byte) (corev1.PodSpec, error) {
	switch kind {
	case "Pod":
		var v corev1.Pod
		err := sigsyaml.UnmarshalStrict(doc, &v)
		return v.Spec, err
	case "Deployment":
		var v appsv1.Deployment
		err := sigsyaml.UnmarshalStrict(doc, &v)
		return v.Spec.Template.Spec, err
	case "StatefulSet":
		var v appsv1.StatefulSet
		err := sigsyaml.UnmarshalStrict(doc, &v)
		return v.Spec.Template.Spec, err
	case "DaemonSet":
		var v appsv1.DaemonSet
		err := sigsyaml.UnmarshalStrict(doc, &v)
		return v.Spec.Template.Spec, err
	case "ReplicaSet":
		var v appsv1.ReplicaSet
		err := sigsyaml.UnmarshalStrict(doc, &v)
		return v.Spec.Template.Spec, err
	case "Job":
		var v batchv1.Job
		err := sigsyaml.UnmarshalStrict(doc, &v)
		return v.Spec.Template.Spec, err
	case "CronJob":
		var v batchv1.CronJob
		err := sigsyaml.UnmarshalStrict(doc, &v)
		return v.Spec.JobTemplate.Spec.Template.Spec, err
	}
	return corev1.PodSpec{}, nil
}

// TestKubernetesNotesAndErrors: skips are explained, bad input is an error
// that names the document, and bad options are refused.
func TestKubernetesNotesAndErrors(t *testing.T) {
	in, _ := os.ReadFile("testdata/kubernetes/mixed.yaml")
	out, notes, err := Kubernetes(in, DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(notes, "\n")
	for _, want := range []string{
		"Pod opted-out: not injected: opted out",
		"Pod decoy: not injected: container imds-proxy is not the sidecar",
		`Pod typo-*: annotation imds-proxy.io/v1: unknown IMDSv1 policy "blokc"`,
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("notes %q lack %q", notes, want)
		}
	}
	if got := strings.Count(string(out), "name: imds-proxy\n"); got != 2 {
		t.Errorf("%d imds-proxy containers in the output, want 2 (the decoy and the typo pod's sidecar)", got)
	}
	daemonsets, _ := os.ReadFile("testdata/kubernetes/daemonset.yaml")
	if _, notes, _ := Kubernetes(daemonsets, DefaultOptions()); len(notes) != 1 || !strings.Contains(notes[0], "DaemonSet monitoring/node-exporter: not injected: hostNetwork") {
		t.Errorf("hostNetwork note: %q", notes)
	}
	permitted := DefaultOptions()
	permitted.Policy.OptOutNamespaces = []string{"monitoring"}
	if _, notes, _ := Kubernetes(daemonsets, permitted); len(notes) != 1 || !strings.Contains(notes[0], "DaemonSet monitoring/node-exporter: skipped: hostNetwork") {
		t.Errorf("hostNetwork note where its namespace is permitted: %q", notes)
	}

	bad := []struct{ name, in, want string }{
		{"not YAML", "kind: ConfigMap\n---\nspec: [\n", "document 2: not valid YAML"},
		{"no pod spec", "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replicas: 1\n", "Deployment x: no pod spec at spec.template.spec"},
		{"wrong type", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\nspec:\n  containers: 3\n", "Pod x: pod spec"},
	}
	for _, c := range bad {
		if _, _, err := Kubernetes([]byte(c.in), DefaultOptions()); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want it to contain %q", c.name, err, c.want)
		}
	}
	for _, o := range []Options{{Port: 8169, MetricsPort: 9169, V1: imdsapi.V1Allow}, {Image: "x", Port: 0, MetricsPort: 9169, V1: imdsapi.V1Allow},
		{Image: "x", Port: 8169, MetricsPort: 8169, V1: imdsapi.V1Allow}, {Image: "x", Port: 8169, MetricsPort: 9169, V1: "sometimes"},
		{Image: "x", Port: 8169, MetricsPort: 9169, V1: imdsapi.V1Allow, Upstream: "https://node:8169"}} {
		if _, _, err := Kubernetes([]byte("kind: Pod\n"), o); err == nil {
			t.Errorf("options %+v accepted", o)
		}
	}
}

// TestKubernetesReadsFieldsAsTheAPIServerDoes: a mis-cased field is no
// field at all to the API server, so "hostnetwork: true" does not make a
// pod a host-network pod here either.
func TestKubernetesReadsFieldsAsTheAPIServerDoes(t *testing.T) {
	in := "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\nspec:\n  hostnetwork: true\n  containers:\n    - name: app\n      image: y\n"
	out, notes, err := Kubernetes([]byte(in), DefaultOptions())
	if err != nil || len(notes) != 0 || !strings.Contains(string(out), "name: imds-proxy") {
		t.Errorf("mis-cased hostnetwork: notes %q, err %v, injected %t; want the pod injected", notes, err, strings.Contains(string(out), "imds-proxy"))
	}
}

// TestKubernetesEmptyFieldsAndLists: an empty or null initContainers or
// volumes is replaced, never duplicated (the API server would refuse the
// duplicate key, or keep the wrong one), and the workloads of a List are
// injected; a pod whose ports clash with the sidecar's is not.
func TestKubernetesEmptyFieldsAndLists(t *testing.T) {
	in, _ := os.ReadFile("testdata/kubernetes/empty-fields.yaml")
	out, _, err := Kubernetes(in, DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	for i, spec := range podSpecs(t, out) {
		if len(spec.InitContainers) != 1 || !equality.Semantic.DeepEqual(spec.InitContainers[0], asAPI[corev1.Container](t, Container(DefaultOptions()))) ||
			len(spec.Volumes) != 1 || !equality.Semantic.DeepEqual(spec.Volumes[0], asAPI[corev1.Volume](t, RunVolume())) {
			t.Errorf("document %d: init containers %d, volumes %+v; want just the sidecar and its volume", i+1, len(spec.InitContainers), spec.Volumes)
		}
	}
	in, _ = os.ReadFile("testdata/kubernetes/list.yaml")
	out, notes, err := Kubernetes(in, DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Items []struct {
			Kind string
			Spec struct {
				Template struct{ Spec corev1.PodSpec }
			}
		}
	}
	if err := sigsyaml.Unmarshal(out, &list); err != nil || len(list.Items) != 3 {
		t.Fatalf("the List does not decode into 3 items: %v", err)
	}
	if got := list.Items[0].Spec.Template.Spec.InitContainers; len(got) != 1 || got[0].Name != ContainerName {
		t.Errorf("the List's Deployment: init containers %+v, want the sidecar", got)
	}
	if len(notes) != 1 || !strings.Contains(notes[0], "Pod clashing: not injected: container app uses port 9169") {
		t.Errorf("notes %q, want the port clash explained", notes)
	}
}

// TestWorkloadRoleTakesOnlyTheEKSSource: the sidecar, root with NET_ADMIN,
// takes from the app containers only what the EKS webhook adds. A token
// file elsewhere (with its directory mounted from a config map over the
// sidecar's own binaries), a token volume that is not a projected service
// account token, or a credentials URI that is not the Pod Identity agent's
// gives it nothing, and a note says why.
func TestWorkloadRoleTakesOnlyTheEKSSource(t *testing.T) {
	const head = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: n\n  annotations:\n    imds-proxy.io/credentials: workload\nspec:\n  containers:\n    - name: app\n      image: x\n      env:\n"
	for name, c := range map[string]struct{ env, mounts, volumes, note string }{
		"binaries from a config map": {
			"        - {name: AWS_CONTAINER_CREDENTIALS_FULL_URI, value: 'http://169.254.170.23/v1/credentials'}\n" +
				"        - {name: AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, value: /usr/local/bin/tok}\n",
			"        - {name: bin, mountPath: /usr/local/bin}\n", "    - {name: bin, configMap: {name: evil, defaultMode: 0755}}\n",
			"token file /usr/local/bin/tok is not in a projected service account token volume"},
		"a config map at the token directory": {
			"        - {name: AWS_ROLE_ARN, value: 'arn:aws:iam::111122223333:role/r'}\n" +
				"        - {name: AWS_WEB_IDENTITY_TOKEN_FILE, value: /var/run/secrets/eks.amazonaws.com/serviceaccount/token}\n",
			"        - {name: t, mountPath: /var/run/secrets/eks.amazonaws.com/serviceaccount}\n", "    - {name: t, configMap: {name: evil}}\n",
			"is not in a projected service account token volume"},
		"another credentials endpoint": {
			"        - {name: AWS_CONTAINER_CREDENTIALS_FULL_URI, value: 'http://127.0.0.1:8080/creds'}\n", "", "",
			"AWS_CONTAINER_CREDENTIALS_FULL_URI is not the EKS Pod Identity agent's"},
	} {
		t.Run(name, func(t *testing.T) {
			manifest := head + c.env
			if c.mounts != "" {
				manifest += "      volumeMounts:\n" + c.mounts + "  volumes:\n" + c.volumes
			}
			out, notes, err := Kubernetes([]byte(manifest), DefaultOptions())
			if err != nil {
				t.Fatal(err)
			}
			var pod corev1.Pod
			if err := sigsyaml.UnmarshalStrict(out, &pod); err != nil {
				t.Fatal(err)
			}
			sidecar := pod.Spec.InitContainers[0]
			if sidecar.Name != ContainerName || len(sidecar.Env) != 0 || len(sidecar.VolumeMounts) != 1 || len(sidecar.Command) != 1 {
				t.Errorf("sidecar env %v, mounts %v, command %v: want the workload-role build with nothing of the app's", sidecar.Env, sidecar.VolumeMounts, sidecar.Command)
			}
			if !strings.Contains(strings.Join(notes, "\n"), c.note) {
				t.Errorf("notes %q, want one saying %q", notes, c.note)
			}
		})
	}
}

// TestKubernetesNotesAnotherRole: a pod whose own sidecar serves the
// instance's role while its annotation asks for its own keeps the sidecar,
// with a note that says so.
func TestKubernetesNotesAnotherRole(t *testing.T) {
	injected, _, err := Kubernetes([]byte("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: n\nspec:\n  containers:\n    - name: app\n      image: x\n"), DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	annotated := strings.Replace(string(injected), "  name: a\n", "  name: a\n  annotations:\n    imds-proxy.io/credentials: workload\n", 1)
	out, notes, err := Kubernetes([]byte(annotated), DefaultOptions())
	if err != nil || string(out) != annotated || !strings.Contains(strings.Join(notes, "\n"), "serves the instance's role") {
		t.Errorf("notes %q, %v; want the pod kept, with a note", notes, err)
	}
}
