package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// writeSelfSigned writes a key pair for 127.0.0.1.
func writeSelfSigned(t *testing.T, certFile, keyFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(key)
	_ = os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	_ = os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
}

// runCLI runs the binary with stdin and returns stdout, stderr and the exit status.
func runCLI(t *testing.T, stdin []byte, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()
}

// TestInjectCommands: the CLI reads stdin or a file, writes the injected
// stream (the inject package's golden output) to stdout and notes to
// stderr, and refuses what it cannot inject with status 1.
func TestInjectCommands(t *testing.T) {
	const testdata = "../../inject/testdata/"
	daemonsets, _ := os.ReadFile(testdata + "kubernetes/daemonset.yaml")
	want, _ := os.ReadFile(testdata + "kubernetes/golden/daemonset.yaml")
	stdout, stderr, code := runCLI(t, daemonsets, "inject", "k8s")
	if code != 0 || stdout != string(want) || !strings.Contains(stderr, "node-exporter: not injected: hostNetwork") {
		t.Errorf("inject k8s < daemonset.yaml: status %d, stdout equal to golden: %t, stderr %q", code, stdout == string(want), stderr)
	}
	if stdout, _, code := runCLI(t, nil, "inject", "k8s", testdata+"kubernetes/daemonset.yaml"); code != 0 || stdout != string(want) {
		t.Errorf("inject k8s FILE: status %d, stdout equal to golden: %t", code, stdout == string(want))
	}
	stdout, _, code = runCLI(t, daemonsets, "inject", "k8s", "--image", "registry.example/imds-proxy:9", "--v1", "block", "-")
	if code != 0 || !strings.Contains(stdout, "image: registry.example/imds-proxy:9") || !strings.Contains(stdout, "--v1=block") {
		t.Errorf("inject k8s --image --v1: status %d\n%s", code, stdout)
	}
	task, _ := os.ReadFile(testdata + "ecs/awsvpc.json")
	wantTask, _ := os.ReadFile(testdata + "ecs/golden/awsvpc.json")
	if stdout, stderr, code := runCLI(t, task, "inject", "ecs"); code != 0 || stdout != string(wantTask) {
		t.Errorf("inject ecs: status %d, stdout equal to golden: %t, stderr %q", code, stdout == string(wantTask), stderr)
	}

	refusals := []struct {
		stdin string
		args  []string
		says  string
	}{
		{`{"networkMode":"bridge","containerDefinitions":[{"name":"a"}]}`, []string{"inject", "ecs"}, "imds-proxy node"},
		{"kind: ConfigMap\n---\nspec: [\n", []string{"inject", "k8s"}, "document 2: not valid YAML"},
		{"", []string{"inject", "k8s", "--v1", "sometimes"}, "unknown IMDSv1 policy"},
		{"", []string{"inject", "k8s", "--port", "9169"}, "both 9169"},
		{"", []string{"inject", "k8s", "--v1-floor", "sometimes"}, "--v1-floor"},
		{"", []string{"inject", "ecs", "--on-violation", "ignore"}, "--on-violation"},
		{"", []string{"inject", "ecs", "--allow-opt-out-namespaces", "shop"}, "flag provided but not defined"},
		{"", []string{"inject", "ecs", "--exempt-uid", "1337"}, "flag provided but not defined"},
		{"", []string{"inject", "k8s", "--exempt-uid", "-1"}, "--exempt-uid"},
		{"", []string{"webhook", "--tls-cert", "c", "--tls-key", "k", "--allow-opt-out-namespaces", "a b"}, "--allow-opt-out-namespaces"},
		{"", []string{"inject", "k8s", "a.yaml", "b.yaml"}, "one input file at most"},
		{"", []string{"inject", "k8s", "/nonexistent/x.yaml"}, "no such file"},
		{"", []string{"webhook"}, "--tls-cert and --tls-key are required"},
		{"", []string{"webhook", "--tls-cert", "/nonexistent/c", "--tls-key", "/nonexistent/k"}, "TLS file"},
	}
	for _, r := range refusals {
		if _, stderr, code := runCLI(t, []byte(r.stdin), r.args...); code != 1 || !strings.Contains(stderr, r.says) {
			t.Errorf("%v: status %d, stderr %q; want 1 saying %q", r.args, code, stderr, r.says)
		}
	}
}

// TestInjectPolicy: `inject k8s` decides the shared policy fixtures as the
// webhook does: with --on-violation=warn violations are notes and the
// stream is written; with deny the first one fails the command; a
// namespace in --allow-opt-out-namespaces makes them skips. Without
// --v1-floor the floor is --v1, and only --exempt-uid makes the
// sidecar-init variant the sidecar. `inject ecs --v1-floor` raises a task
// definition's own sidecar, and --on-violation=deny refuses a container
// that could bypass it.
func TestInjectPolicy(t *testing.T) {
	const testdata = "../../inject/testdata/"
	pods, err := os.ReadFile(testdata + "policy/pods.yaml")
	if err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := runCLI(t, pods, "inject", "k8s", "--v1-floor", "block")
	if code != 0 || strings.Contains(stdout, "--v1=allow") {
		t.Errorf("--v1-floor block: status %d, a sidecar with --v1=allow in the output: %t", code, strings.Contains(stdout, "--v1=allow"))
	}
	for _, want := range []string{"Pod shop/decoy-env: not injected: container imds-proxy is not the sidecar (it differs from the sidecar at env)",
		"Pod shop/loosening: annotation imds-proxy.io/v1: allow is looser than the floor",
		"Pod shop/sidecar-init-as-1337: container app can become UID 1337"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("--on-violation=warn: stderr lacks %q:\n%s", want, stderr)
		}
	}
	if _, stderr, code := runCLI(t, pods, "inject", "k8s", "--on-violation", "deny"); code != 1 || !strings.Contains(stderr, "refused (--on-violation=deny)") {
		t.Errorf("--on-violation=deny: status %d, stderr %q; want 1 and the refusal", code, stderr)
	}
	if _, stderr, code := runCLI(t, pods, "inject", "k8s", "--on-violation", "deny", "--allow-opt-out-namespaces", "kube-system, shop"); code != 0 ||
		!strings.Contains(stderr, "Pod shop/opted-out: skipped: opted out") {
		t.Errorf("deny, shop permitted: status %d, stderr %q; want 0 and the opt-out skipped", code, stderr)
	}

	// Without --v1-floor the floor is --v1: the annotation of shop/loosening
	// cannot loosen --v1 block, nor does an injected sidecar keep --v1=allow.
	stdout, stderr, code = runCLI(t, pods, "inject", "k8s", "--v1", "block")
	if code != 0 || strings.Contains(stdout, "--v1=allow") || !strings.Contains(stderr, "Pod shop/loosening: annotation imds-proxy.io/v1: allow is looser than the floor") {
		t.Errorf("--v1 block, no --v1-floor: status %d, a sidecar with --v1=allow in the output: %t, stderr %q", code, strings.Contains(stdout, "--v1=allow"), stderr)
	}
	// The sidecar-init variant is the sidecar only with the operator's
	// --exempt-uid (1337 by default).
	if _, stderr, code := runCLI(t, pods, "inject", "k8s", "--exempt-uid", "1000"); code != 0 ||
		!strings.Contains(stderr, "Pod shop/sidecar-init: not injected: container imds-proxy is not the sidecar (its imds-proxy-rules container exempts UID 1337, not --exempt-uid=1000)") ||
		!strings.Contains(stderr, "Pod shop/sidecar-init-own-uid: container app can become UID 1000") {
		t.Errorf("--exempt-uid 1000: status %d, stderr %q", code, stderr)
	}
	if _, stderr, code := runCLI(t, []byte(`{"networkMode":"awsvpc","containerDefinitions":[{"name":"a","image":"b","privileged":true}]}`),
		"inject", "ecs", "--on-violation", "deny"); code != 1 || !strings.Contains(stderr, "refused (--on-violation=deny): container a is privileged") {
		t.Errorf("inject ecs --on-violation deny, a privileged container: status %d, stderr %q; want 1 and the refusal", code, stderr)
	}

	task, _ := os.ReadFile(testdata + "ecs/golden/awsvpc.json")
	stdout, stderr, code = runCLI(t, task, "inject", "ecs", "--v1-floor", "block")
	if code != 0 || !strings.Contains(stdout, `"--v1=block"`) || !strings.Contains(stderr, "--v1=auto is looser than the floor") {
		t.Errorf("inject ecs --v1-floor block on an injected task definition: status %d, --v1=block %t, stderr %q", code, strings.Contains(stdout, `"--v1=block"`), stderr)
	}
}

// TestReadyCommand is the ECS health check: 0 against a ready proxy, 1
// with a reason against nothing.
func TestReadyCommand(t *testing.T) {
	aemm := testutil.StartAEMM(t, "-I")
	proxy := startBinary(t, nil, "--upstream", aemm.URL)
	waitReady(t, proxy)
	if _, stderr, code := runCLI(t, nil, "ready", "--url", proxy.Metrics+"/readyz"); code != 0 {
		t.Errorf("ready against a ready proxy: status %d, %s", code, stderr)
	}
	if _, stderr, code := runCLI(t, nil, "ready", "--url", "http://127.0.0.1:1/readyz", "--timeout", "1s"); code != 1 || !strings.Contains(stderr, "not ready") {
		t.Errorf("ready against nothing: status %d, %q", code, stderr)
	}
}

// TestWebhookCommand starts `imds-proxy webhook` with a self-signed key
// pair and a denying policy, checks it serves /healthz over TLS, injects a
// pod, refuses a decoy, counts both, and stops cleanly on SIGTERM.
// (The webhook package tests admission itself.)
func TestWebhookCommand(t *testing.T) {
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	writeSelfSigned(t, cert, key)
	cmd := exec.Command(binary, "webhook", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key,
		"--v1-floor=block", "--on-violation=deny")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	p := testutil.StartProcess(t, cmd)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	resp, err := client.Get(strings.Replace(p.API, "http://", "https://", 1) + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil {
		t.Errorf("/healthz: %d over TLS %v", resp.StatusCode, resp.TLS != nil)
	}
	review := `{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"1",` +
		`"resource":{"version":"v1","resource":"pods"},"operation":"CREATE",` +
		`"object":{"apiVersion":"v1","kind":"Pod","spec":{"containers":[{"name":"app","image":"x"}]}}}}`
	resp, err = client.Post(strings.Replace(p.API, "http://", "https://", 1)+"/inject", "application/json", strings.NewReader(review))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `"patchType":"JSONPatch"`) {
		t.Errorf("/inject: %s", body)
	}
	decoy := strings.Replace(review, `"containers":[`, `"initContainers":[{"name":"imds-proxy","image":"busybox"}],"containers":[`, 1)
	resp, err = client.Post(strings.Replace(p.API, "http://", "https://", 1)+"/inject", "application/json", strings.NewReader(decoy))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `"allowed":false`) || !strings.Contains(string(body), "container imds-proxy is not the sidecar") {
		t.Errorf("/inject with a decoy, --on-violation=deny: %s", body)
	}
	if status, metrics := get(t, "GET", p.Metrics+"/metrics", nil); status != 200 ||
		!strings.Contains(metrics, `imds_proxy_webhook_admissions_total{result="injected"} 1`) ||
		!strings.Contains(metrics, `imds_proxy_webhook_admissions_total{result="denied"} 1`) {
		t.Errorf("/metrics: %d, without the admissions counted", status)
	}
	client.CloseIdleConnections()
	p.Terminate(t)
}
