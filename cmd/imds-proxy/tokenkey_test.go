package main

import (
	"bytes"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// mintToken gets a client token from the proxy at api.
func mintToken(t *testing.T, api string) string {
	t.Helper()
	status, tok := get(t, "PUT", api+"/latest/api/token", http.Header{"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": {"21600"}})
	if status != 200 || tok == "" {
		t.Fatalf("PUT token: %d %q", status, tok)
	}
	return tok
}

func instanceID(t *testing.T, api, tok string) int {
	t.Helper()
	status, _ := get(t, "GET", api+"/latest/meta-data/instance-id", http.Header{"X-Aws-Ec2-Metadata-Token": {tok}})
	return status
}

func TestTokensSurviveRestartWithKeyFile(t *testing.T) {
	aemm := testutil.StartAEMM(t, "-I")
	env := []string{"IMDS_PROXY_UPSTREAM=" + aemm.URL, "IMDS_PROXY_V1=block"}
	keyFile := filepath.Join(t.TempDir(), "token-key")

	first := startBinary(t, env, "--token-key-file", keyFile)
	waitReady(t, first)
	info, err := os.Stat(keyFile)
	if err != nil {
		t.Fatalf("the proxy did not create --token-key-file: %v", err)
	}
	if perm := info.Mode().Perm(); perm != 0o600 {
		t.Errorf("key file created with mode %04o, want 0600", perm)
	}
	created, _ := os.ReadFile(keyFile)
	tok := mintToken(t, first.API)
	if status := instanceID(t, first.API, tok); status != 200 {
		t.Fatalf("before the restart: %d, want 200", status)
	}
	first.Terminate(t)

	second := startBinary(t, env, "--token-key-file", keyFile)
	waitReady(t, second)
	if status := instanceID(t, second.API, tok); status != 200 {
		t.Errorf("token minted before the restart, same --token-key-file: %d, want 200\n%s", status, second.Logs.String())
	}
	if now, _ := os.ReadFile(keyFile); !bytes.Equal(now, created) {
		t.Error("the restart rewrote the key file")
	}
	for _, logs := range []string{first.Logs.String(), second.Logs.String()} {
		if key := strings.Fields(strings.Split(string(created), "\n")[1]); len(key) == 2 && strings.Contains(logs, key[1][:16]) {
			t.Error("the key is in the log")
		}
	}
	second.Terminate(t)

	// Without a key file, today's behaviour: a restart means a new key.
	third := startBinary(t, env)
	waitReady(t, third)
	tok = mintToken(t, third.API)
	third.Terminate(t)
	fourth := startBinary(t, env)
	waitReady(t, fourth)
	if status := instanceID(t, fourth.API, tok); status != 401 {
		t.Errorf("token minted before a restart without --token-key-file: %d, want 401", status)
	}
}

func TestTokenKeyFileRefusedWhenOpen(t *testing.T) {
	keyFile := filepath.Join(t.TempDir(), "token-key")
	valid := "imds-proxy-token-key v1\ncurrent " + strings.Repeat("5a", 32) + "\n"
	if err := os.WriteFile(keyFile, []byte(valid), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(keyFile, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(binary, "sidecar", "--rules=false", "--listen=127.0.0.1:0", "--metrics-listen=",
		"--upstream=http://127.0.0.1:1", "--token-key-file="+keyFile).CombinedOutput()
	if err == nil {
		t.Fatalf("started with a world-readable key file:\n%s", out)
	}
	for _, want := range []string{"--token-key-file", keyFile, "chmod 600"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("error does not say %q:\n%s", want, out)
		}
	}
	if strings.Contains(string(out), "5a5a5a5a") {
		t.Errorf("the error shows the key:\n%s", out)
	}
}

func TestConcurrentStartsShareOneKey(t *testing.T) {
	aemm := testutil.StartAEMM(t, "-I")
	keyFile := filepath.Join(t.TempDir(), "token-key")
	addrs := []string{testutil.FreeLoopbackAddr(t), testutil.FreeLoopbackAddr(t)}
	logs := make([]*testutil.SyncBuffer, len(addrs))
	for i, addr := range addrs {
		logs[i] = &testutil.SyncBuffer{}
		cmd := exec.Command(binary, "sidecar", "--rules=false", "--listen="+addr, "--metrics-listen=",
			"--upstream="+aemm.URL, "--v1=block", "--token-key-file="+keyFile)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
		cmd.Stderr = logs[i]
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	}
	for i, addr := range addrs {
		if err := testutil.WaitListening(addr, 10*time.Second); err != nil {
			t.Fatalf("proxy %d did not start: %v\n%s", i, err, logs[i].String())
		}
	}
	tok := mintToken(t, "http://"+addrs[0])
	deadline := time.Now().Add(10 * time.Second)
	for status := instanceID(t, "http://"+addrs[1], tok); status != 200; status = instanceID(t, "http://"+addrs[1], tok) {
		if status == 401 || time.Now().After(deadline) {
			t.Fatalf("token of one of two proxies started at once with the same new key file, at the other: %d, want 200\n%s\n%s",
				status, logs[0].String(), logs[1].String())
		}
		time.Sleep(50 * time.Millisecond) // 503 until the upstream session is decided
	}
	entries, err := os.ReadDir(filepath.Dir(keyFile))
	if err != nil || len(entries) != 1 {
		t.Errorf("key file directory holds %d entries (%v), want only the key file", len(entries), err)
	}
}
