package deploy

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestGenCerts runs deploy/kubernetes/webhook/gen-certs.sh and checks what
// it writes and prints: a serving certificate that chains to ca.crt for the
// webhook Service's names with serverAuth, its key, and the two kubectl
// commands with the right caBundle for both webhooks; kubectl itself is
// never run.
func TestGenCerts(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("openssl is not installed (CI=true: not skipping)")
		}
		t.Skip("openssl is not installed")
	}
	script, err := filepath.Abs(filepath.Join(kubernetesDir, "webhook", "gen-certs.sh"))
	if err != nil {
		t.Fatal(err)
	}
	if info, err := os.Stat(script); err != nil || info.Mode()&0o111 == 0 {
		t.Fatalf("%s is not executable (%v)", script, err)
	}

	// A kubectl that records being run, first on PATH.
	fake := t.TempDir()
	ran := filepath.Join(fake, "kubectl-ran")
	if err := os.WriteFile(filepath.Join(fake, "kubectl"), []byte("#!/bin/sh\ntouch '"+ran+"'\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "certs")
	cmd := exec.Command(script, out)
	cmd.Env = append(os.Environ(), "PATH="+fake+string(os.PathListSeparator)+os.Getenv("PATH"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("gen-certs.sh: %v\n%s%s", err, stdout.String(), stderr.String())
	}
	if _, err := os.Stat(ran); !errors.Is(err, os.ErrNotExist) {
		t.Error("gen-certs.sh ran kubectl")
	}

	read := func(name string) []byte {
		data, err := os.ReadFile(filepath.Join(out, name))
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	caPEM, certPEM, keyPEM := read("ca.crt"), read("tls.crt"), read("tls.key")
	if info, err := os.Stat(filepath.Join(out, "tls.key")); err != nil || info.Mode().Perm()&0o077 != 0 {
		t.Errorf("tls.key is readable by others (%v)", err)
	}
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		t.Errorf("tls.crt and tls.key are not a pair: %v", err)
	}
	ca, leaf := parseCert(t, caPEM), parseCert(t, certPEM)
	if !ca.IsCA || leaf.IsCA {
		t.Errorf("ca.crt IsCA %v, tls.crt IsCA %v", ca.IsCA, leaf.IsCA)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	for _, name := range []string{"imds-proxy-webhook.imds-proxy.svc", "imds-proxy-webhook.imds-proxy.svc.cluster.local"} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			t.Errorf("tls.crt for %s: %v", name, err)
		}
	}
	// The checks above can fail.
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "imds-proxy-webhook.default.svc", Roots: roots}); err == nil {
		t.Error("tls.crt verifies for a name it was not issued for")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "imds-proxy-webhook.imds-proxy.svc", Roots: x509.NewCertPool()}); err == nil {
		t.Error("tls.crt verifies without its CA")
	}
	if !(len(leaf.ExtKeyUsage) == 1 && leaf.ExtKeyUsage[0] == x509.ExtKeyUsageServerAuth) {
		t.Errorf("tls.crt extended key usage %v, want serverAuth only", leaf.ExtKeyUsage)
	}
	if d := leaf.NotAfter.Sub(leaf.NotBefore); d < 364*24*time.Hour || d > 366*24*time.Hour {
		t.Errorf("tls.crt is valid for %v, want 365 days", d)
	}

	// What it prints: the two commands, with this CA.
	printed := stdout.String()
	for _, want := range []string{
		"kubectl -n imds-proxy create secret tls imds-proxy-webhook-tls --cert=" + filepath.Join(out, "tls.crt") + " --key=" + filepath.Join(out, "tls.key"),
		"kubectl patch mutatingwebhookconfiguration imds-proxy --type=json -p '",
	} {
		if !strings.Contains(printed, want) {
			t.Errorf("output lacks %q:\n%s", want, printed)
		}
	}
	m := regexp.MustCompile(`--type=json -p '([^']*)'`).FindStringSubmatch(printed)
	if m == nil {
		t.Fatalf("no JSON patch in the output:\n%s", printed)
	}
	var patch []struct{ Op, Path, Value string }
	if err := json.Unmarshal([]byte(m[1]), &patch); err != nil {
		t.Fatalf("the JSON patch: %v", err)
	}
	caBundle := base64.StdEncoding.EncodeToString(caPEM)
	if len(patch) != 2 {
		t.Fatalf("the patch has %d operations, want 2 (one per webhook)", len(patch))
	}
	for i, op := range patch {
		if want := "/webhooks/" + string(rune('0'+i)) + "/clientConfig/caBundle"; op.Op != "add" || op.Path != want || op.Value != caBundle {
			t.Errorf("patch operation %d: %s %s (value is ca.crt: %v), want add %s", i, op.Op, op.Path, op.Value == caBundle, want)
		}
	}

	// Usage errors.
	if err := exec.Command(script).Run(); err == nil {
		t.Error("gen-certs.sh without an output directory succeeded")
	}
}

func parseCert(t *testing.T, data []byte) *x509.Certificate {
	t.Helper()
	block, rest := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
		t.Fatalf("not one PEM certificate:\n%s", data)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}
