package webhook

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"maps"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	jsonpatch "github.com/evanphx/json-patch/v5"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/inject"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testCA signs server certificates for the webhook tests.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// writePair writes a server key pair for 127.0.0.1 with the given serial.
func (ca *testCA) writePair(t *testing.T, dir string, serial int64) (certFile, keyFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "imds-proxy-webhook"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writeAtomically(t, certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeAtomically(t, keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	return certFile, keyFile
}

// writeAtomically replaces a file by rename, as a Secret volume update does.
func writeAtomically(t *testing.T, name string, data []byte) {
	t.Helper()
	if err := os.WriteFile(name+".new", data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(name+".new", name); err != nil {
		t.Fatal(err)
	}
}

// startWebhook serves the handler with o over real HTTPS with certificate
// reloading.
func startWebhook(t *testing.T, reg *prometheus.Registry, o inject.Options) (url string, client *http.Client, ca *testCA, dir string) {
	t.Helper()
	ca, dir = newTestCA(t), t.TempDir()
	certFile, keyFile := ca.writePair(t, dir, 100)
	log := zap.NewNop()
	certs, err := NewCertReloader(certFile, keyFile, log)
	if err != nil {
		t.Fatal(err)
	}
	h, err := NewHandler(o, log, reg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, TLSConfig: &tls.Config{GetCertificate: certs.GetCertificate, MinVersion: tls.VersionTLS12}}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.pool}, DisableKeepAlives: true}
	t.Cleanup(transport.CloseIdleConnections)
	return "https://" + ln.Addr().String(), &http.Client{Transport: transport, Timeout: 5 * time.Second}, ca, dir
}

func review(t *testing.T, obj any, mutate func(*admissionv1.AdmissionRequest)) []byte {
	t.Helper()
	raw, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	req := &admissionv1.AdmissionRequest{
		UID:       types.UID("c0ffee"),
		Kind:      metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
		Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
		Namespace: "shop",
		Operation: admissionv1.Create,
		Object:    runtime.RawExtension{Raw: raw},
	}
	if mutate != nil {
		mutate(req)
	}
	body, _ := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"}, Request: req})
	return body
}

func post(t *testing.T, client *http.Client, url, contentType string, body []byte) (int, []byte) {
	t.Helper()
	resp, err := client.Post(url+InjectPath, contentType, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// answer posts an AdmissionReview and returns the response to it.
func answer(t *testing.T, client *http.Client, url string, body []byte) *admissionv1.AdmissionResponse {
	t.Helper()
	status, out := post(t, client, url, "application/json", body)
	if status != http.StatusOK {
		t.Fatalf("status %d: %s", status, out)
	}
	var r admissionv1.AdmissionReview
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatal(err)
	}
	if r.Kind != "AdmissionReview" || r.APIVersion != "admission.k8s.io/v1" || r.Response == nil || r.Response.UID != "c0ffee" {
		t.Fatalf("not an AdmissionReview v1 response for uid c0ffee: %s", out)
	}
	return r.Response
}

// admit is answer, failing the test unless the pod is allowed.
func admit(t *testing.T, client *http.Client, url string, body []byte) *admissionv1.AdmissionResponse {
	t.Helper()
	resp := answer(t, client, url, body)
	if !resp.Allowed {
		t.Fatalf("refused: %+v", resp.Result)
	}
	return resp
}

func pod(hostNetwork bool, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{GenerateName: "web-", Namespace: "shop", Annotations: annotations},
		Spec:       corev1.PodSpec{HostNetwork: hostNetwork, Containers: []corev1.Container{{Name: "web", Image: "example.com/web:1"}}},
	}
}

// TestWebhookInjects: a pod comes back with a JSON Patch that, applied,
// gives it the sidecar; the patched pod is not patched again.
func TestWebhookInjects(t *testing.T) {
	url, client, _, _ := startWebhook(t, prometheus.NewRegistry(), inject.DefaultOptions())
	p := pod(false, nil)
	resp := admit(t, client, url, review(t, p, nil))
	if resp.PatchType == nil || *resp.PatchType != admissionv1.PatchTypeJSONPatch || len(resp.Patch) == 0 {
		t.Fatalf("no JSON Patch in %+v", resp)
	}
	patch, err := jsonpatch.DecodePatch(resp.Patch)
	if err != nil {
		t.Fatal(err)
	}
	original, _ := json.Marshal(p)
	patchedJSON, err := patch.Apply(original)
	if err != nil {
		t.Fatalf("patch does not apply: %v", err)
	}
	var patched corev1.Pod
	if err := json.Unmarshal(patchedJSON, &patched); err != nil {
		t.Fatal(err)
	}
	var sidecar corev1.Container
	if raw, _ := json.Marshal(inject.Container(inject.DefaultOptions())); json.Unmarshal(raw, &sidecar) != nil {
		t.Fatal("the sidecar does not decode into core/v1")
	}
	if len(patched.Spec.InitContainers) != 1 || !equality.Semantic.DeepEqual(patched.Spec.InitContainers[0], sidecar) {
		t.Errorf("patched pod's init containers: %+v", patched.Spec.InitContainers)
	}
	if again := admit(t, client, url, review(t, &patched, nil)); again.Patch != nil {
		t.Errorf("an injected pod was patched again: %s", again.Patch)
	}
}

// TestWebhookAllowsWithoutPatch: everything the webhook should not or
// cannot patch is allowed unchanged by default (--on-violation=warn), with
// a warning where the user should hear of it.
func TestWebhookAllowsWithoutPatch(t *testing.T) {
	reg := prometheus.NewRegistry()
	url, client, _, _ := startWebhook(t, reg, inject.DefaultOptions())
	cases := []struct {
		name    string
		body    []byte
		warning string
	}{
		{"opted out", review(t, pod(false, map[string]string{inject.InjectKey: inject.Disabled}), nil), "pod not injected: opted out"},
		{"hostNetwork", review(t, pod(true, nil), nil), "pod not injected: hostNetwork"},
		{"update", review(t, pod(false, nil), func(r *admissionv1.AdmissionRequest) { r.Operation = admissionv1.Update }), ""},
		{"not a pod", review(t, pod(false, nil), func(r *admissionv1.AdmissionRequest) {
			r.Resource = metav1.GroupVersionResource{Group: "apps", Version: "v1", Resource: "deployments"}
		}), ""},
		{"subresource", review(t, pod(false, nil), func(r *admissionv1.AdmissionRequest) { r.SubResource = "ephemeralcontainers" }), ""},
		{"undecodable pod", review(t, map[string]any{"spec": map[string]any{"containers": 5}}, nil), "pod not injected"},
	}
	for _, c := range cases {
		resp := admit(t, client, url, c.body)
		if resp.Patch != nil {
			t.Errorf("%s: patched: %s", c.name, resp.Patch)
		}
		if got := strings.Join(resp.Warnings, ";"); !strings.Contains(got, c.warning) || (c.warning == "" && got != "") {
			t.Errorf("%s: warnings %q, want %q", c.name, got, c.warning)
		}
	}
	typo := admit(t, client, url, review(t, pod(false, map[string]string{inject.V1Key: "blokc"}), nil))
	if typo.Patch == nil || len(typo.Warnings) != 1 || !strings.Contains(typo.Warnings[0], "blokc") {
		t.Errorf("bad policy annotation: patch %s, warnings %q; want a patch and a warning", typo.Patch, typo.Warnings)
	}
	want := map[string]float64{"warned": 2, "ignored": 3, "unreadable": 1, "injected": 1}
	if got := admissions(t, reg); !maps.Equal(got, want) {
		t.Errorf("imds_proxy_webhook_admissions_total %v, want %v", got, want)
	}
}

// TestWebhookRejectsBadRequests: malformed, mistyped and oversized bodies
// get clear 4xx answers (no panic), and the webhook keeps serving.
func TestWebhookRejectsBadRequests(t *testing.T) {
	reg := prometheus.NewRegistry()
	url, client, _, _ := startWebhook(t, reg, inject.DefaultOptions())
	good := review(t, pod(false, nil), nil)
	huge := append([]byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x","object":{"pad":"`),
		bytes.Repeat([]byte("a"), MaxBodyBytes)...)
	huge = append(huge, `"}}}`...)
	cases := []struct {
		name, contentType string
		body              []byte
		status            int
		says              string
	}{
		{"not JSON", "application/json", []byte("{not json"), 400, "malformed AdmissionReview"},
		{"empty", "application/json", nil, 400, "malformed AdmissionReview"},
		{"truncated", "application/json", good[:len(good)/2], 400, "malformed AdmissionReview"},
		{"v1beta1", "application/json", bytes.Replace(good, []byte("admission.k8s.io/v1"), []byte("admission.k8s.io/v1beta1"), 1), 400, "want an admission.k8s.io/v1 AdmissionReview"},
		{"no request", "application/json", []byte(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}`), 400, "with a request"},
		{"wrong kind", "application/json", []byte(`{"apiVersion":"admission.k8s.io/v1","kind":"Pod","request":{"uid":"x"}}`), 400, "want an admission.k8s.io/v1 AdmissionReview"},
		{"array", "application/json", []byte(`[]`), 400, "malformed AdmissionReview"},
		{"text/plain", "text/plain", good, 415, "want application/json"},
		{"no content type", "", good, 415, "want application/json"},
		{"oversized", "application/json", huge, 413, "larger than"},
	}
	for _, c := range cases {
		status, out := post(t, client, url, c.contentType, c.body)
		if status != c.status || !strings.Contains(string(out), c.says) {
			t.Errorf("%s: %d %q, want %d saying %q", c.name, status, out, c.status, c.says)
		}
	}
	resp, err := client.Get(url + InjectPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET %s: %d, want 405", InjectPath, resp.StatusCode)
	}
	if admit(t, client, url, good).Patch == nil {
		t.Error("after the bad requests a good one was not patched")
	}
	if got := admissions(t, reg); got["bad_request"] != float64(len(cases)) || got["injected"] != 1 {
		t.Errorf("imds_proxy_webhook_admissions_total %v, want %d bad requests and 1 injected", got, len(cases))
	}
}

// TestWebhookReloadsItsCertificate: replacing the key pair on disk (as a
// Secret update or a cert-manager renewal does) changes the certificate
// new connections see, without a restart; a broken pair keeps the old one.
func TestWebhookReloadsItsCertificate(t *testing.T) {
	url, client, ca, dir := startWebhook(t, prometheus.NewRegistry(), inject.DefaultOptions())
	serial := func() int64 {
		resp, err := client.Get(url + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.TLS.PeerCertificates[0].SerialNumber.Int64()
	}
	if got := serial(); got != 100 {
		t.Fatalf("serial %d, want 100", got)
	}
	ca.writePair(t, dir, 200)
	deadline := time.Now().Add(5 * CheckInterval)
	for serial() != 200 {
		if time.Now().After(deadline) {
			t.Fatalf("certificate not reloaded after %s", 5*CheckInterval)
		}
		time.Sleep(100 * time.Millisecond)
	}
	writeAtomically(t, filepath.Join(dir, "tls.key"), []byte("not a key"))
	time.Sleep(CheckInterval + 100*time.Millisecond)
	if got := serial(); got != 200 {
		t.Errorf("after a broken key was written: serial %d, want the previous certificate (200)", got)
	}
}

// TestCertReloaderRefusesBadFiles: startup fails clearly without a pair.
func TestCertReloaderRefusesBadFiles(t *testing.T) {
	dir := t.TempDir()
	if _, err := NewCertReloader(filepath.Join(dir, "missing.crt"), filepath.Join(dir, "missing.key"), zap.NewNop()); err == nil || !strings.Contains(err.Error(), "missing.crt") {
		t.Errorf("missing files: %v", err)
	}
	bad := filepath.Join(dir, "bad")
	_ = os.WriteFile(bad, []byte("junk"), 0o600)
	if _, err := NewCertReloader(bad, bad, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "TLS key pair") {
		t.Errorf("junk files: %v", err)
	}
}

// admissions reads imds_proxy_webhook_admissions_total by result.
func admissions(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range families {
		if f.GetName() != "imds_proxy_webhook_admissions_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			out[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
		}
	}
	return out
}

// fixture is a pod of ../inject/testdata/policy/pods.yaml, the fixtures
// the inject and CLI tests share, with what it expects.
type fixture struct {
	pod           corev1.Pod
	outcome, says string
}

func fixtures(t *testing.T) []fixture {
	t.Helper()
	stream, err := os.ReadFile("../inject/testdata/policy/pods.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var out []fixture
	for _, doc := range strings.Split(string(stream), "\n---\n") {
		var f fixture
		if err := sigsyaml.UnmarshalStrict([]byte(doc), &f.pod); err != nil {
			t.Fatal(err)
		}
		f.outcome, f.says = f.pod.Annotations["test.imds-proxy.io/outcome"], f.pod.Annotations["test.imds-proxy.io/says"]
		out = append(out, f)
	}
	return out
}

// TestWebhookPolicy sends every shared fixture to a webhook with a block
// floor, once warning and once denying: a violation is admitted unpatched
// with a warning that says why, or refused with a 403 that says why; a
// container that could bypass the sidecar is warned about, or refused; every
// warning fits what the API server shows in full; the metric counts each
// result.
func TestWebhookPolicy(t *testing.T) {
	for _, on := range []inject.OnViolation{inject.Warn, inject.Deny} {
		t.Run(string(on), func(t *testing.T) {
			o := inject.DefaultOptions()
			o.Policy = inject.Policy{V1Floor: imdsapi.V1Block, OnViolation: on, OptOutNamespaces: []string{"kube-system"}}
			reg := prometheus.NewRegistry()
			url, client, _, _ := startWebhook(t, reg, o)
			counts := map[string]float64{}
			for _, f := range fixtures(t) {
				want := f.outcome
				if want == "violation" || want == "bypass" {
					want = map[inject.OnViolation]string{inject.Warn: "warned", inject.Deny: "denied"}[on]
				}
				counts[want]++
				resp := answer(t, client, url, review(t, &f.pod, nil))
				said := strings.Join(resp.Warnings, "\n")
				if resp.Result != nil {
					said += "\n" + resp.Result.Message
				}
				if !strings.Contains(said, f.says) {
					t.Errorf("%s: warnings and status %q do not say %q", f.pod.Name, said, f.says)
				}
				for _, w := range resp.Warnings {
					if len(w) > 256 || !strings.HasPrefix(w, "imds-proxy: ") || strings.HasSuffix(w, ": ") {
						t.Errorf("%s: warning of %d characters (the API server may cut those over 256), without the imds-proxy: prefix, or empty: %q", f.pod.Name, len(w), w)
					}
				}
				switch want {
				case "denied":
					if resp.Allowed || resp.Patch != nil || resp.Result == nil || resp.Result.Code != http.StatusForbidden ||
						!strings.HasPrefix(resp.Result.Message, "imds-proxy: pod refused: ") {
						t.Errorf("%s: allowed %t, patch %s, status %+v; want a 403 refusal", f.pod.Name, resp.Allowed, resp.Patch, resp.Result)
					}
				case "injected":
					if !resp.Allowed || resp.Patch == nil {
						t.Errorf("%s: allowed %t, patch %s; want a patch", f.pod.Name, resp.Allowed, resp.Patch)
					}
				default:
					if !resp.Allowed || resp.Result != nil {
						t.Errorf("%s: allowed %t, status %+v; want it admitted", f.pod.Name, resp.Allowed, resp.Result)
					}
				}
			}
			if got := admissions(t, reg); !maps.Equal(got, counts) {
				t.Errorf("imds_proxy_webhook_admissions_total %v, want %v", got, counts)
			}
		})
	}
}

// TestWebhookPermitsOptOutNamespaces: in a namespace the operator lists,
// an opted-out pod is skipped, neither warned about nor refused; the
// same pod elsewhere is refused.
func TestWebhookPermitsOptOutNamespaces(t *testing.T) {
	o := inject.DefaultOptions()
	o.Policy = inject.Policy{OnViolation: inject.Deny, OptOutNamespaces: []string{"batch"}}
	reg := prometheus.NewRegistry()
	url, client, _, _ := startWebhook(t, reg, o)
	optOut := pod(false, map[string]string{inject.InjectKey: inject.Disabled})
	inBatch := admit(t, client, url, review(t, optOut, func(r *admissionv1.AdmissionRequest) { r.Namespace = "batch" }))
	if inBatch.Patch != nil || len(inBatch.Warnings) != 0 {
		t.Errorf("opted out in a permitted namespace: patch %s, warnings %q; want neither", inBatch.Patch, inBatch.Warnings)
	}
	if inShop := answer(t, client, url, review(t, optOut, nil)); inShop.Allowed || !strings.Contains(inShop.Result.Message, `namespace "shop" is not in --allow-opt-out-namespaces`) {
		t.Errorf("opted out in namespace shop: allowed %t, status %+v; want a refusal naming the namespace", inShop.Allowed, inShop.Result)
	}
	unreadable := review(t, map[string]any{"spec": map[string]any{"containers": 5}}, nil)
	if resp := answer(t, client, url, unreadable); resp.Allowed {
		t.Error("a pod the webhook cannot read, with --on-violation=deny: allowed")
	}
	if got, want := admissions(t, reg), map[string]float64{"skipped": 1, "denied": 2}; !maps.Equal(got, want) {
		t.Errorf("imds_proxy_webhook_admissions_total %v, want %v", got, want)
	}
}
