package main

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestSidecarFailsClosedOnIPv6: when the IPv6 redirect cannot be installed
// (ip6tables has no nat table, or [::1] cannot be bound) in a task that
// reaches [fd00:ec2::254], the sidecar is not ready and says why; a task
// without IPv6 stays ready.
func TestSidecarFailsClosedOnIPv6(t *testing.T) {
	natless, err := filepath.Abs(filepath.Join("..", "..", "iptables", "testdata", "ip6tables-nat-unavailable"))
	if err != nil {
		t.Fatal(err)
	}
	brokenIP6tables := []string{"PATH=" + natless + string(os.PathListSeparator) + os.Getenv("PATH")}
	for _, tc := range []struct {
		name  string
		env   []string
		setup func(t *testing.T, task *testutil.Netns)
		// reason is in /readyz and the log when the sidecar must not be
		// ready; "" when it must be.
		reason string
	}{
		{"ip6tables nat table unavailable", brokenIP6tables, func(*testing.T, *testutil.Netns) {}, "fd00:ec2::254"},
		{"[::1] taken", nil, holdIPv6Loopback, "fd00:ec2::254"},
		{"IPv6 disabled", brokenIP6tables, disableIPv6, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newSidecarEC2(t)
			tc.setup(t, e.Task)
			proxy := testutil.StartProxy(t, e.Task, binary, sidecarArgs("--iptables-backend", "nft", "--reconcile-interval", "200ms"),
				testutil.WithEnv(tc.env...), testutil.UntilServing())
			if tc.reason == "" {
				proxy.WaitReady(t, e.Task)
				if status, _ := e.Task.Get(t, "169.254.169.254:80", "/latest/meta-data/instance-id", nil); status != http.StatusOK {
					t.Errorf("tokenless GET through the IPv4 redirect: %d, want 200\n%s", status, proxy.Logs.String())
				}
				return
			}
			// The upstream session is decided within a second; after
			// that only the IPv6 gap can keep the sidecar from ready.
			var status int
			var body string
			deadline := time.Now().Add(5 * time.Second)
			for time.Now().Before(deadline) && !strings.Contains(body, tc.reason) {
				status, body = e.Task.Get(t, "127.0.0.1:9169", "/readyz", nil)
				if status == http.StatusOK {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if status != http.StatusServiceUnavailable || !strings.Contains(body, tc.reason) {
				t.Errorf("/readyz: %d %q; want 503 naming %s\n%s", status, body, tc.reason, proxy.Logs.String())
			}
			if !strings.Contains(proxy.Logs.String(), tc.reason) {
				t.Errorf("the log does not name %s:\n%s", tc.reason, proxy.Logs.String())
			}
			// doctor, run where the app containers run, names the gap too.
			doctor := e.Task.Command(binary, "doctor", "--json")
			doctor.Env = append([]string{"PATH=" + os.Getenv("PATH")}, tc.env...)
			out, _ := doctor.Output() // its exit status is the IMDS diagnosis
			var report struct {
				Rules string `json:"redirect_rules"`
			}
			if err := json.Unmarshal(out, &report); err != nil || !strings.Contains(report.Rules, "IPv4 only") {
				t.Errorf("doctor's redirect_rules: %q (%v); want it to say only IPv4 is redirected\n%s", report.Rules, err, out)
			}
		})
	}
}

// holdIPv6Loopback binds [::1]:8169 in task, so the sidecar cannot.
func holdIPv6Loopback(t *testing.T, task *testutil.Netns) {
	t.Helper()
	var ln net.Listener
	var err error
	task.Do(t, func() { ln, err = net.Listen("tcp", "[::1]:8169") })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
}

// disableIPv6 removes IPv6 from task: no address, no route.
func disableIPv6(t *testing.T, task *testutil.Netns) {
	t.Helper()
	task.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
}
