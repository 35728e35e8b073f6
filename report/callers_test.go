package report

import (
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/workload"
)

// TestFromCallers: rows that name their workload (a node agent's) are
// counted under it, a sidecar's under its pod's, and the rest as unknown;
// would-block leaves out what a block already refused, the policy is the
// latest call's, and callers are the distinct programs.
func TestFromCallers(t *testing.T) {
	at := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	web := workload.Workload{Platform: "kubernetes", Namespace: "team-a", Name: "Deployment/web"}
	row := func(caller, exe string, w workload.Workload, count, blocked uint64, policy imdsapi.V1Policy, first, last time.Duration) proxy.V1Caller {
		return proxy.V1Caller{Caller: caller, SDK: "curl", Process: attribution.Process{Executable: exe}, Workload: w,
			Count: count, Blocked: blocked, Policy: policy, FirstSeen: at.Add(-first), LastSeen: at.Add(-last)}
	}
	inv := FromCallers([]ProxyCallers{
		{Proxy: "imds-proxy/imds-proxy-node-a", Callers: []proxy.V1Caller{
			row("10.0.5.10", "/usr/bin/curl", web, 10, 4, imdsapi.V1Block, time.Hour, time.Minute),
			row("10.0.5.11", "/usr/bin/curl", web, 5, 0, imdsapi.V1Warn, 2*time.Hour, 30*time.Minute),
			row("10.0.5.99", "", workload.Workload{}, 2, 0, imdsapi.V1Warn, time.Hour, time.Hour),
		}},
		{Proxy: "imds-proxy/imds-proxy-node-b", Callers: []proxy.V1Caller{
			row("10.0.6.10", "/usr/bin/curl", web, 1, 0, imdsapi.V1Warn, time.Hour, time.Hour),
		}},
		{Proxy: "team-b/api-7c9d-xk2p", Namespace: "team-b", Workload: "Deployment/api", Callers: []proxy.V1Caller{
			row("127.0.0.1", "/usr/bin/python3", workload.Workload{}, 3, 0, imdsapi.V1Allow, time.Hour, 0),
			row("127.0.0.1", "/usr/bin/curl", workload.Workload{}, 1, 0, imdsapi.V1Allow, time.Hour, 0),
		}},
	}, []string{"imds-proxy/imds-proxy-node-c: connection refused"}, at)

	want := []Row{
		{Namespace: "team-a", Workload: "Deployment/web", Calls: 16, WouldBlock: 12, Proxies: 2, Callers: 3, Policy: "block",
			FirstSeen: at.Add(-2 * time.Hour), LastSeen: at.Add(-time.Minute)},
		{Namespace: "team-b", Workload: "Deployment/api", Calls: 4, WouldBlock: 4, Proxies: 1, Callers: 2, Policy: "allow",
			FirstSeen: at.Add(-time.Hour), LastSeen: at},
		{Namespace: "", Workload: Unknown, Calls: 2, WouldBlock: 2, Proxies: 1, Callers: 1, Policy: "warn",
			FirstSeen: at.Add(-time.Hour), LastSeen: at.Add(-time.Hour)},
	}
	if len(inv.Rows) != len(want) {
		t.Fatalf("rows %+v, want %d", inv.Rows, len(want))
	}
	for i, w := range want {
		got := inv.Rows[i]
		if len(got.SDKs) != 1 || got.SDKs[0] != "curl" {
			t.Errorf("row %d: SDKs %v, want [curl]", i, got.SDKs)
		}
		got.SDKs = nil
		if got.Namespace != w.Namespace || got.Workload != w.Workload || got.Calls != w.Calls || got.WouldBlock != w.WouldBlock ||
			got.Proxies != w.Proxies || got.Callers != w.Callers || got.Policy != w.Policy || !got.FirstSeen.Equal(w.FirstSeen) || !got.LastSeen.Equal(w.LastSeen) {
			t.Errorf("row %d:\n got %+v\nwant %+v", i, got, w)
		}
	}
	if !inv.From.Equal(at.Add(-2*time.Hour)) || inv.Step != 0 || len(inv.Burndown) != 0 || len(inv.Unreached) != 1 {
		t.Errorf("inventory from %s, step %s, burn-down %v, unreached %v", inv.From, inv.Step, inv.Burndown, inv.Unreached)
	}
}
