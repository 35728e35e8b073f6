package deploy

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	kustomizetypes "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/imds-proxy/imds-proxy/inject"
)

var update = flag.Bool("update", false, "rewrite the generated manifests (deploy/kubernetes/sidecar/deployment.yaml, deploy/ecs/sidecar-task-definition.json) from their inputs")

// The tests run in deploy/, so these paths are relative to it.
const (
	kubernetesDir = "kubernetes"
	ecsDir        = "ecs"
)

// typedKinds are the Kubernetes kinds the manifests may hold, each with the
// k8s.io/api type it must decode into strictly.
var typedKinds = map[string]func() any{
	"v1 Namespace":       func() any { return &corev1.Namespace{} },
	"v1 ServiceAccount":  func() any { return &corev1.ServiceAccount{} },
	"v1 Service":         func() any { return &corev1.Service{} },
	"apps/v1 Deployment": func() any { return &appsv1.Deployment{} },
	"apps/v1 DaemonSet":  func() any { return &appsv1.DaemonSet{} },
	"admissionregistration.k8s.io/v1 MutatingWebhookConfiguration": func() any {
		return &admissionregistrationv1.MutatingWebhookConfiguration{}
	},
	"rbac.authorization.k8s.io/v1 ClusterRole":        func() any { return &rbacv1.ClusterRole{} },
	"rbac.authorization.k8s.io/v1 ClusterRoleBinding": func() any { return &rbacv1.ClusterRoleBinding{} },
}

// ciliumKinds are the cilium.io/v2 kinds the manifests may hold. Cilium's
// Go types are not a dependency; ciliumLocalRedirectPolicy mirrors the
// fields of its API, so a misspelled or unknown field fails the strict
// decode.
var ciliumKinds = map[string]func() any{
	"CiliumLocalRedirectPolicy": func() any { return &ciliumLocalRedirectPolicy{} },
}

// ciliumLocalRedirectPolicy is cilium.io/v2 CiliumLocalRedirectPolicy with
// the field names and JSON tags of Cilium's CiliumLocalRedirectPolicySpec,
// RedirectFrontend, Frontend, ServiceInfo, RedirectBackend and PortInfo
// (cilium/cilium pkg/k8s/apis/cilium.io/v2/clrp_types.go), as its CRD
// schema publishes them (pkg/k8s/apis/cilium.io/client/crds/v2/
// ciliumlocalredirectpolicies.yaml at commit
// 183c5888026980a9d1168f585ed4de328cc1448c). Left out on purpose:
// status (written by Cilium) and redirectBackend.overrideIP, which only
// the newest Cilium knows (an older one would silently prune it).
type ciliumLocalRedirectPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		RedirectFrontend struct {
			AddressMatcher *struct {
				IP      string           `json:"ip"`
				ToPorts []ciliumPortInfo `json:"toPorts"`
			} `json:"addressMatcher,omitempty"`
			ServiceMatcher *struct {
				Name      string           `json:"serviceName"`
				Namespace string           `json:"namespace"`
				ToPorts   []ciliumPortInfo `json:"toPorts,omitempty"`
			} `json:"serviceMatcher,omitempty"`
		} `json:"redirectFrontend"`
		RedirectBackend struct {
			LocalEndpointSelector metav1.LabelSelector `json:"localEndpointSelector"`
			ToPorts               []ciliumPortInfo     `json:"toPorts"`
		} `json:"redirectBackend"`
		SkipRedirectFromBackend *bool  `json:"skipRedirectFromBackend,omitempty"`
		Description             string `json:"description,omitempty"`
	} `json:"spec"`
}

// ciliumPortInfo is Cilium's PortInfo: the port is a string, the protocol
// TCP or UDP.
type ciliumPortInfo struct {
	Port     string `json:"port"`
	Protocol string `json:"protocol"`
	Name     string `json:"name,omitempty"`
}

// certManagerKinds are the cert-manager.io/v1 kinds the manifests may
// hold. cert-manager's Go types are not a dependency; these are the fields
// of its API that the manifests use, so a misspelled or unexpected field
// still fails the strict decode.
var certManagerKinds = map[string]func() any{
	"Issuer":      func() any { return &issuer{} },
	"Certificate": func() any { return &certificate{} },
}

type issuer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SelfSigned *struct {
			CRLDistributionPoints []string `json:"crlDistributionPoints,omitempty"`
		} `json:"selfSigned,omitempty"`
		CA *struct {
			SecretName string `json:"secretName"`
		} `json:"ca,omitempty"`
	} `json:"spec"`
}

type certificate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SecretName  string   `json:"secretName"`
		CommonName  string   `json:"commonName,omitempty"`
		DNSNames    []string `json:"dnsNames,omitempty"`
		Duration    string   `json:"duration,omitempty"`
		RenewBefore string   `json:"renewBefore,omitempty"`
		Usages      []string `json:"usages,omitempty"`
		IsCA        bool     `json:"isCA,omitempty"`
		PrivateKey  *struct {
			Algorithm      string `json:"algorithm,omitempty"`
			Size           int    `json:"size,omitempty"`
			Encoding       string `json:"encoding,omitempty"`
			RotationPolicy string `json:"rotationPolicy,omitempty"`
		} `json:"privateKey,omitempty"`
		IssuerRef struct {
			Name  string `json:"name"`
			Kind  string `json:"kind,omitempty"`
			Group string `json:"group,omitempty"`
		} `json:"issuerRef"`
	} `json:"spec"`
}

// document is one YAML document of a manifest file.
type document struct {
	file  string
	index int // 1-based, within the file
	raw   []byte
	meta  metav1.TypeMeta
	obj   metav1.ObjectMeta
}

func (d document) String() string { return fmt.Sprintf("%s (document %d)", d.file, d.index) }

// id names a resource as kustomize does: kind, namespace and name.
func id(kind, namespace, name string) string {
	if namespace == "" {
		return kind + " " + name
	}
	return kind + " " + namespace + "/" + name
}

// splitYAML cuts a YAML stream into its documents the way kubectl does,
// dropping documents that hold only comments or whitespace.
func splitYAML(data []byte) ([][]byte, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		var v any
		if err := yaml.Unmarshal(doc, &v); err != nil {
			return nil, err
		}
		if v != nil {
			docs = append(docs, doc)
		}
	}
}

// manifestFiles are the YAML files under deploy/kubernetes.
func manifestFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(kubernetesDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && (strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no YAML files under %s", kubernetesDir)
	}
	return files
}

func isKustomization(path string) bool {
	switch filepath.Base(path) {
	case "kustomization.yaml", "kustomization.yml", "Kustomization":
		return true
	}
	return false
}

// strictYAML decodes a YAML document into v strictly: no unknown field, no
// duplicate key. sigs.k8s.io/yaml.UnmarshalStrict alone is not enough: it
// decodes with encoding/json, which matches keys to fields ignoring case,
// so "readonlyRootFilesystem" would pass for readOnlyRootFilesystem, and
// the API server, which matches case-sensitively, would drop it. So the
// document is also decoded the API server's way, with sigs.k8s.io/json.
func strictYAML(raw []byte, v any) error {
	if err := yaml.UnmarshalStrict(raw, v); err != nil {
		return err
	}
	j, err := yaml.YAMLToJSONStrict(raw)
	if err != nil {
		return err
	}
	again := reflect.New(reflect.TypeOf(v).Elem()).Interface()
	strictErrs, err := sigsjson.UnmarshalStrict(j, again)
	if err != nil {
		return err
	}
	return errors.Join(strictErrs...)
}

// decodeStrictly decodes doc into the type its apiVersion and kind call
// for, rejecting unknown and duplicate fields. It returns the value.
func decodeStrictly(raw []byte, meta metav1.TypeMeta) (any, error) {
	var newValue func() any
	switch {
	case meta.APIVersion == "cert-manager.io/v1":
		newValue = certManagerKinds[meta.Kind]
	case meta.APIVersion == "cilium.io/v2":
		newValue = ciliumKinds[meta.Kind]
	default:
		newValue = typedKinds[meta.APIVersion+" "+meta.Kind]
	}
	if newValue == nil {
		return nil, fmt.Errorf("unexpected apiVersion %q kind %q: add its type to the test, or fix the manifest", meta.APIVersion, meta.Kind)
	}
	v := newValue()
	if err := strictYAML(raw, v); err != nil {
		return nil, fmt.Errorf("%s %s: %w", meta.APIVersion, meta.Kind, err)
	}
	return v, nil
}

// resources reads every Kubernetes resource of the manifest files (not
// the kustomization files), failing the test on anything that does not
// decode strictly.
func resources(t *testing.T) []document {
	t.Helper()
	var docs []document
	for _, file := range manifestFiles(t) {
		if isKustomization(file) {
			continue
		}
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		chunks, err := splitYAML(data)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if len(chunks) == 0 {
			t.Errorf("%s: no documents", file)
		}
		for i, raw := range chunks {
			d := document{file: file, index: i + 1, raw: raw}
			if err := yaml.Unmarshal(raw, &d.meta); err != nil {
				t.Errorf("%s: %v", d, err)
				continue
			}
			var objMeta struct {
				Metadata metav1.ObjectMeta `json:"metadata"`
			}
			if err := yaml.Unmarshal(raw, &objMeta); err != nil {
				t.Errorf("%s: %v", d, err)
				continue
			}
			d.obj = objMeta.Metadata
			docs = append(docs, d)
		}
	}
	return docs
}

// TestManifestsDecodeStrictly: every document of every YAML file under
// deploy/kubernetes is a known kind that decodes strictly into its API
// type (k8s.io/api, or the cert-manager fields above); every kustomization
// file decodes strictly into kustomize's own type and uses no deprecated
// field; every file opens with a comment.
func TestManifestsDecodeStrictly(t *testing.T) {
	kinds := map[string]int{}
	for _, d := range resources(t) {
		if _, err := decodeStrictly(d.raw, d.meta); err != nil {
			t.Errorf("%s: %v", d, err)
		}
		if d.meta.APIVersion == "cert-manager.io/v1" && d.obj.Namespace != "imds-proxy" {
			t.Errorf("%s: %s %s is in namespace %q, want imds-proxy (next to the webhook)", d, d.meta.Kind, d.obj.Name, d.obj.Namespace)
		}
		if d.obj.Name == "" {
			t.Errorf("%s: no metadata.name", d)
		}
		kinds[d.meta.APIVersion+" "+d.meta.Kind]++
	}
	// Every kind the test knows about is in use: a type table that has
	// drifted from the manifests would hide a gap.
	for kind := range typedKinds {
		if kinds[kind] == 0 {
			t.Errorf("no manifest of %s", kind)
		}
	}
	for kind := range certManagerKinds {
		if kinds["cert-manager.io/v1 "+kind] == 0 {
			t.Errorf("no manifest of cert-manager.io/v1 %s", kind)
		}
	}
	for kind := range ciliumKinds {
		if kinds["cilium.io/v2 "+kind] == 0 {
			t.Errorf("no manifest of cilium.io/v2 %s", kind)
		}
	}

	for _, file := range manifestFiles(t) {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(data, []byte("# ")) {
			t.Errorf("%s: does not open with a comment saying what it is", file)
		}
		if !isKustomization(file) {
			continue
		}
		var k kustomizetypes.Kustomization
		if err := strictYAML(data, &k); err != nil {
			t.Errorf("%s: %v", file, err)
			continue
		}
		wantAPI := map[string]string{
			kustomizetypes.KustomizationKind: kustomizetypes.KustomizationVersion,
			kustomizetypes.ComponentKind:     kustomizetypes.ComponentVersion,
		}[k.Kind]
		if wantAPI == "" || k.APIVersion != wantAPI {
			t.Errorf("%s: apiVersion %q kind %q: want a %s %s or %s %s", file, k.APIVersion, k.Kind,
				kustomizetypes.KustomizationVersion, kustomizetypes.KustomizationKind,
				kustomizetypes.ComponentVersion, kustomizetypes.ComponentKind)
		}
		if deprecated := k.CheckDeprecatedFields(); deprecated != nil && len(*deprecated) > 0 {
			t.Errorf("%s: deprecated fields: %v", file, *deprecated)
		}
	}
}

// TestStrictDecodingCatchesMisspelledFields proves that the decoding above
// is strict: a misspelled field, which the lenient decoder silently drops,
// fails it, at the top level, deep in a pod template, in a webhook, in RBAC,
// in a cert-manager resource and in a Cilium policy, and so does a field
// whose only mistake is its case, which sigs.k8s.io/yaml.UnmarshalStrict
// alone lets through.
func TestStrictDecodingCatchesMisspelledFields(t *testing.T) {
	for _, c := range []struct {
		file, field, typo string
	}{
		{"kubernetes/node/daemonset.yaml", "hostNetwork:", "hostNetwrok:"},
		{"kubernetes/node/daemonset.yaml", "readOnlyRootFilesystem:", "readonlyRootFilesystem:"},
		{"kubernetes/webhook/mutatingwebhookconfiguration.yaml", "failurePolicy:", "failurePolicyy:"},
		{"kubernetes/webhook/cert-manager/certificate.yaml", "dnsNames:", "dnsName:"},
		{"kubernetes/webhook/cert-manager/certificate.yaml", "isCA:", "isCa:"},
		{"kubernetes/webhook/cert-manager/issuer.yaml", "secretName:", "secretname:"},
		{"kubernetes/cilium/localredirectpolicy.yaml", "localEndpointSelector:", "localEndpointSelecter:"},
		{"kubernetes/cilium/localredirectpolicy.yaml", "addressMatcher:", "addressmatcher:"},
		{"kubernetes/node-with-metrics/rbac.yaml", "nonResourceURLs:", "nonResourceUrls:"},
	} {
		data, err := os.ReadFile(c.file)
		if err != nil {
			t.Fatal(err)
		}
		// The first use of the field as a key, not a mention in a comment.
		field := regexp.MustCompile(`(?m)^(\s*(?:- )?)` + regexp.QuoteMeta(c.field))
		loc := field.FindSubmatchIndex(data)
		if loc == nil {
			t.Fatalf("%s has no %q to misspell", c.file, c.field)
		}
		bad := slices.Concat(data[:loc[3]], []byte(c.typo), data[loc[1]:])
		chunks, err := splitYAML(bad)
		if err != nil {
			t.Fatalf("%s: %v", c.file, err)
		}
		// The one document of the file that has the typo.
		chunks = slices.DeleteFunc(chunks, func(doc []byte) bool { return !bytes.Contains(doc, []byte(c.typo)) })
		if len(chunks) != 1 {
			t.Fatalf("%s: %d documents with %s, want 1", c.file, len(chunks), c.typo)
		}
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal(chunks[0], &meta); err != nil {
			t.Fatal(err)
		}
		lenient := typedKinds[meta.APIVersion+" "+meta.Kind]
		if lenient == nil {
			lenient = certManagerKinds[meta.Kind]
		}
		if lenient == nil {
			lenient = ciliumKinds[meta.Kind]
		}
		if err := yaml.Unmarshal(chunks[0], lenient()); err != nil {
			t.Errorf("%s with %s: the lenient decoder fails too (%v), so this proves nothing", c.file, c.typo, err)
		}
		_, err = decodeStrictly(chunks[0], meta)
		if err == nil || !strings.Contains(err.Error(), strings.TrimSuffix(c.typo, ":")) {
			t.Errorf("%s with %s: strict decoding gave %v, want an unknown field error naming it", c.file, c.typo, err)
		}
	}

	// A kind the test does not know fails rather than passing unchecked.
	if _, err := decodeStrictly([]byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"), metav1.TypeMeta{APIVersion: "v1", Kind: "ConfigMap"}); err == nil {
		t.Error("an unknown kind decoded")
	}
	// The stream splitter sees every document, including one after a
	// comment-only document and one without a leading "---".
	docs, err := splitYAML([]byte("# head\n---\n# only a comment\n---\na: 1\n---\nb: 2\n"))
	if err != nil || len(docs) != 2 {
		t.Errorf("splitYAML: %d documents, %v; want 2", len(docs), err)
	}
}

// kustomizeBuild builds the kustomization in dir (a path on disk) as
// `kubectl apply -k` would, and returns its resources by id.
func kustomizeBuild(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	out := map[string][]byte{}
	for _, r := range m.Resources() {
		raw, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		out[id(r.GetKind(), r.GetNamespace(), r.GetName())] = raw
	}
	return out
}

// builtObject decodes one resource of a build strictly into v.
func builtObject(t *testing.T, build map[string][]byte, key string, v any) {
	t.Helper()
	raw, ok := build[key]
	if !ok {
		t.Fatalf("the build has no %s; it has %v", key, keys(build))
	}
	if err := strictYAML(raw, v); err != nil {
		t.Fatalf("%s: %v", key, err)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

var (
	namespaceIDs = []string{"Namespace imds-proxy"}
	nodeIDs      = append(slices.Clone(namespaceIDs),
		"ServiceAccount imds-proxy/imds-proxy-node",
		"ClusterRole imds-proxy-node",
		"ClusterRoleBinding imds-proxy-node",
		"DaemonSet imds-proxy/imds-proxy-node")
	nodeWithMetricsIDs = append(slices.Clone(nodeIDs),
		"ClusterRole imds-proxy-node-kube-rbac-proxy",
		"ClusterRoleBinding imds-proxy-node-kube-rbac-proxy",
		"ClusterRole imds-proxy-metrics-reader",
		"Service imds-proxy/imds-proxy-node-metrics")
	ciliumIDs = append(slices.Clone(nodeIDs),
		"CiliumLocalRedirectPolicy imds-proxy/imds-proxy-node")
	webhookIDs = append(slices.Clone(namespaceIDs),
		"ServiceAccount imds-proxy/imds-proxy-webhook",
		"Deployment imds-proxy/imds-proxy-webhook",
		"Service imds-proxy/imds-proxy-webhook",
		"MutatingWebhookConfiguration imds-proxy")
	certManagerIDs = []string{
		"Issuer imds-proxy/imds-proxy-selfsigned",
		"Certificate imds-proxy/imds-proxy-webhook-ca",
		"Issuer imds-proxy/imds-proxy-ca",
		"Certificate imds-proxy/imds-proxy-webhook",
	}
)

// TestKustomizeBuilds: every kustomization under deploy/kubernetes builds
// with kustomize (the cert-manager component alone, and applied to the
// webhook base by the webhook-with-cert-manager overlay) into exactly the
// expected resources, and together the builds hold every resource of the
// manifest files: none is left out of its base.
func TestKustomizeBuilds(t *testing.T) {
	want := map[string][]string{
		"sidecar":                                {"Deployment default/example-app"},
		"sidecar-init":                           {"Deployment default/example-app"},
		"namespace":                              namespaceIDs,
		"node":                                   nodeIDs,
		"node-with-metrics":                      nodeWithMetricsIDs,
		"cilium":                                 ciliumIDs,
		"webhook":                                webhookIDs,
		filepath.Join("webhook", "cert-manager"): certManagerIDs,
		"webhook-with-cert-manager":              append(slices.Clone(webhookIDs), certManagerIDs...),
		"report":                                 {"ClusterRole imds-proxy-report"},
	}

	var dirs []string
	for _, file := range manifestFiles(t) {
		if isKustomization(file) {
			dir, _ := filepath.Rel(kubernetesDir, filepath.Dir(file))
			dirs = append(dirs, dir)
		}
	}
	slices.Sort(dirs)
	if got := keys(want); !slices.Equal(dirs, got) {
		t.Fatalf("kustomizations under %s: %v; the test checks %v", kubernetesDir, dirs, got)
	}

	built := map[string]bool{}
	for _, dir := range dirs {
		got := keys(kustomizeBuild(t, filepath.Join(kubernetesDir, dir)))
		wantIDs := slices.Sorted(slices.Values(want[dir]))
		if !slices.Equal(got, wantIDs) {
			t.Errorf("kustomize build %s:\n got  %v\n want %v", dir, got, wantIDs)
		}
		for _, k := range got {
			built[k] = true
		}
	}
	for _, d := range resources(t) {
		if k := id(d.meta.Kind, d.obj.Namespace, d.obj.Name); !built[k] {
			t.Errorf("%s: %s is in no kustomization", d, k)
		}
	}
}

// checkImage: every container that runs imds-proxy runs the image the
// injector puts in, so that one version bump moves them all.
func checkImage(t *testing.T, where, image string) {
	t.Helper()
	if image != inject.DefaultImage {
		t.Errorf("%s: image %q, want inject.DefaultImage %q", where, image, inject.DefaultImage)
	}
}

// TestGeneratedManifests: the sidecar examples are what the injector makes
// of the app alone, byte for byte: deploy/kubernetes/sidecar/deployment.yaml
// is inject.Kubernetes(deploy/testdata/example-app.yaml) and
// deploy/ecs/sidecar-task-definition.json is
// inject.ECSTaskDefinition(deploy/ecs/app-task-definition.json), both with
// inject.DefaultOptions(). With -update it rewrites them instead.
func TestGeneratedManifests(t *testing.T) {
	for _, c := range []struct {
		in, out string
		inject  func([]byte) ([]byte, error)
	}{
		{
			in:  filepath.Join("testdata", "example-app.yaml"),
			out: filepath.Join(kubernetesDir, "sidecar", "deployment.yaml"),
			inject: func(in []byte) ([]byte, error) {
				out, notes, err := inject.Kubernetes(in, inject.DefaultOptions())
				if len(notes) > 0 {
					return nil, fmt.Errorf("notes: %q", notes)
				}
				return out, err
			},
		},
		{
			in:  filepath.Join(ecsDir, "app-task-definition.json"),
			out: filepath.Join(ecsDir, "sidecar-task-definition.json"),
			inject: func(in []byte) ([]byte, error) {
				return inject.ECSTaskDefinition(in, inject.DefaultOptions())
			},
		},
	} {
		in, err := os.ReadFile(c.in)
		if err != nil {
			t.Fatal(err)
		}
		want, err := c.inject(in)
		if err != nil {
			t.Fatalf("injecting %s: %v", c.in, err)
		}
		if bytes.Equal(want, in) {
			t.Errorf("injecting %s changed nothing", c.in)
		}
		if *update {
			if err := os.WriteFile(c.out, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(c.out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is not the injected %s; regenerate it with\n  go test ./deploy -run TestGeneratedManifests -update\n--- got\n%s\n--- want\n%s", c.out, c.in, got, want)
		}
	}

	// The app-only input is itself a valid manifest.
	data, err := os.ReadFile(filepath.Join("testdata", "example-app.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var d appsv1.Deployment
	if err := strictYAML(data, &d); err != nil {
		t.Errorf("testdata/example-app.yaml: %v", err)
	}
}
