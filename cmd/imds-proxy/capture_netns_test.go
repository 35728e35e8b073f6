package main

import (
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestSidecarRestoresShadowedCapture: an ACCEPT inserted above the sidecar's
// jump and a RETURN at the top of its chain disable the redirect without
// deleting a rule. The next reconcile logs them and restores the capture,
// leaving the foreign ACCEPT below the jump, and requests are redirected
// again.
func TestSidecarRestoresShadowedCapture(t *testing.T) {
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			e := newSidecarEC2(t)
			proxy := testutil.StartProxy(t, e.Task, binary, sidecarArgs("--reconcile-interval", "200ms", "--iptables-backend", backend))
			save := func() string { return e.Task.IptablesSave(t, "iptables-"+backend+"-save") }
			installed := save()

			const accept = "-A OUTPUT -d 169.254.169.254/32 -j ACCEPT"
			e.Task.Run(t, "iptables-"+backend, "-t", "nat", "-I", "OUTPUT", "1", "-d", "169.254.169.254/32", "-j", "ACCEPT")
			e.Task.Run(t, "iptables-"+backend, "-t", "nat", "-I", "IMDS_PROXY_OUTPUT", "1", "-j", "RETURN")
			if _, err := proxy.Logs.WaitFor("restoring the capture", 10*time.Second); err != nil {
				t.Errorf("the shadowed redirect was not noticed: %v\n%s", err, proxy.Logs.String())
			}
			lines := strings.Split(installed, "\n")
			jump := slices.IndexFunc(lines, func(l string) bool { return strings.HasSuffix(l, "-j IMDS_PROXY_OUTPUT") })
			want := strings.Join(slices.Insert(lines, jump+1, accept), "\n")
			waitFor(t, 10*time.Second, func() bool { return save() == want }, "the capture to be restored with the ACCEPT below the jump")
			for _, found := range []string{`"position":1,"rule":"` + accept, `"position":1,"rule":"-A IMDS_PROXY_OUTPUT -j RETURN"`} {
				if !strings.Contains(proxy.Logs.String(), found) {
					t.Errorf("the log does not name %s:\n%s", found, proxy.Logs.String())
				}
			}
			if status, _ := e.Task.Get(t, "169.254.169.254:80", "/latest/meta-data/instance-id", nil); status != http.StatusOK {
				t.Errorf("tokenless GET after the repair: %d, want 200 through the proxy", status)
			}
			e.Task.WaitReady(t, "127.0.0.1:9169")
		})
	}
}
