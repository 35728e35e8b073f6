// Package testutil starts the real peers that imds-proxy's tests run against
// (amazon-ec2-metadata-mock as a process) and observes what crosses the wire.
// Everything it starts listens on loopback and is stopped by t.Cleanup.
package testutil

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// AEMMModule is the amazon-ec2-metadata-mock version the tests run.
const AEMMModule = "github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock@v1.13.0"

// aemmBuild guards building the AEMM binary once per test process.
var aemmBuild struct {
	once sync.Once
	path string
	err  error
}

// AEMMBinary returns the path of the ec2-metadata-mock binary: $AEMM_BIN when
// set (make test sets it), else one built with `go install` into a cache
// directory shared by test runs.
func AEMMBinary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("AEMM_BIN"); p != "" {
		return p
	}
	aemmBuild.once.Do(func() {
		dir := filepath.Join(os.TempDir(), "imds-proxy-test-aemm-v1.13.0")
		aemmBuild.path = filepath.Join(dir, "ec2-metadata-mock")
		if _, err := os.Stat(aemmBuild.path); err == nil {
			return
		}
		cmd := exec.Command("go", "install", AEMMModule)
		cmd.Env = append(os.Environ(), "GOBIN="+dir)
		if out, err := cmd.CombinedOutput(); err != nil {
			aemmBuild.err = fmt.Errorf("go install %s: %v\n%s", AEMMModule, err, out)
		}
	})
	if aemmBuild.err != nil {
		t.Fatal(aemmBuild.err)
	}
	return aemmBuild.path
}

// AEMM is a running amazon-ec2-metadata-mock process.
type AEMM struct {
	// URL is http://127.0.0.1:PORT.
	URL  string
	Addr string
	cmd  *exec.Cmd
	logs *SyncBuffer
}

// StartAEMM starts ec2-metadata-mock on a free loopback port. Pass "-I" to
// require IMDSv2 tokens, as an instance with HttpTokens=required does.
func StartAEMM(t testing.TB, args ...string) *AEMM {
	t.Helper()
	return StartAEMMAt(t, FreeLoopbackAddr(t), args...)
}

// StartAEMMAt starts ec2-metadata-mock listening on addr (127.0.0.1:PORT).
func StartAEMMAt(t testing.TB, addr string, args ...string) *AEMM {
	t.Helper()
	return startAEMM(t, nil, addr, args...)
}

// StartAEMMIn starts ec2-metadata-mock inside ns, listening on addr
// (169.254.169.254:80, say).
func StartAEMMIn(t testing.TB, ns *Netns, addr string, args ...string) *AEMM {
	t.Helper()
	return startAEMM(t, ns, addr, args...)
}

func startAEMM(t testing.TB, ns *Netns, addr string, args ...string) *AEMM {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	logs := &SyncBuffer{}
	argv := append([]string{"-n", host, "-p", port}, args...)
	cmd := commandIn(ns, append([]string{AEMMBinary(t)}, argv...)...)
	cmd.Dir = t.TempDir() // AEMM looks for config files in its working directory and $HOME
	cmd.Env = append(os.Environ(), "HOME="+cmd.Dir)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting ec2-metadata-mock: %v", err)
	}
	a := &AEMM{URL: "http://" + addr, Addr: addr, cmd: cmd, logs: logs}
	t.Cleanup(a.Stop)
	wait := func() error { return WaitListening(addr, 10*time.Second) }
	if ns != nil {
		inner := wait
		wait = func() (err error) { ns.Do(t, func() { err = inner() }); return err }
	}
	if err := wait(); err != nil {
		a.Stop()
		t.Fatalf("ec2-metadata-mock did not start: %v\n%s", err, logs.String())
	}
	return a
}

// Stop kills the process and waits for it; it is safe to call twice.
func (a *AEMM) Stop() {
	if a.cmd.ProcessState != nil {
		return
	}
	_ = a.cmd.Process.Kill()
	_ = a.cmd.Wait()
}

// Logs returns what the process printed so far. AEMM logs every request that
// passes its token check, and "Token required; No token provided." for every
// tokenless one it refuses.
func (a *AEMM) Logs() string { return a.logs.String() }

// FreeLoopbackAddr returns a 127.0.0.1 address whose port was free a moment ago.
func FreeLoopbackAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// WaitListening waits until something accepts TCP connections on addr.
func WaitListening(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			return c.Close()
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// SyncBuffer collects a process's output while a test reads it.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// CountLines counts the lines of s that contain substr.
func CountLines(s, substr string) int {
	n := 0
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, substr) {
			n++
		}
	}
	return n
}

// AEMMCredentialsExpiring returns AEMM arguments that make its role
// credentials expire at expiry (its built-in ones expired in 2020, which
// SDKs tolerate but a cache must not keep).
func AEMMCredentialsExpiring(t testing.TB, expiry time.Time) []string {
	t.Helper()
	config := fmt.Sprintf(`{"metadata":{"values":{"iam-security-credentials":{"Code":"Success",`+
		`"LastUpdated":%q,"Type":"AWS-HMAC","AccessKeyId":"ASIATESTFRESH","SecretAccessKey":"test-secret",`+
		`"Token":"test-session-token","Expiration":%q}}}}`, time.Now().UTC().Format(time.RFC3339), expiry.UTC().Format(time.RFC3339))
	path := filepath.Join(t.TempDir(), "aemm-credentials.json")
	if err := os.WriteFile(path, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	return []string{"-c", path}
}
