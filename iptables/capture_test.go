package iptables

import (
	"fmt"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// shadowingRules disable a sidecar's redirect without deleting any of its
// rules: an ACCEPT above the jump, and a RETURN at the top of its chain.
var shadowingRules = [][]string{
	{"-t", "nat", "-I", "OUTPUT", "1", "-d", "169.254.169.254/32", "-j", "ACCEPT"},
	{"-t", "nat", "-I", ChainOutput, "1", "-j", "RETURN"},
}

// TestReconcileRestoresCapture: one reconcile puts the jump first again and
// the chain back exactly as built, leaves the foreign ACCEPT in place below
// the jump, and logs and counts what it found.
func TestReconcileRestoresCapture(t *testing.T) {
	for _, backend := range []Backend{BackendNFT, BackendLegacy} {
		for _, batch := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/batch=%t", backend, batch), func(t *testing.T) { testRestoresCapture(t, backend, batch) })
		}
	}
}

func testRestoresCapture(t *testing.T, backend Backend, batch bool) {
	ns := testutil.NewNetns(t)
	bin := "iptables-" + string(backend)
	for _, r := range unrelatedRules {
		ns.Run(t, append([]string{bin}, r...)...)
	}
	core, logs := observer.New(zap.InfoLevel)
	reg := prometheus.NewRegistry()
	var m *Manager
	ns.Do(t, func() {
		m = installedManager(t, sidecarConfig(), backend, batch, zap.New(core), WithMetrics(reg))
	})
	installed := ns.IptablesSave(t, bin+"-save")
	for _, r := range shadowingRules {
		ns.Run(t, append([]string{bin}, r...)...)
	}

	var readyErr error
	ns.Do(t, func() {
		m.reconcileOnce()
		readyErr = m.Ready()
	})
	want := withLineAfter(t, installed, "-j "+ChainOutput, "-A OUTPUT -d 169.254.169.254/32 -j ACCEPT")
	if got := ns.IptablesSave(t, bin+"-save"); got != want {
		t.Errorf("after reconcile:\n%s\nwant the capture restored and the foreign ACCEPT below the jump:\n%s", got, want)
	}
	if readyErr != nil {
		t.Errorf("Ready after the repair: %v", readyErr)
	}
	for _, found := range []struct{ chain, rule string }{
		{"OUTPUT", "-A OUTPUT -d 169.254.169.254/32 -j ACCEPT"},
		{ChainOutput, "-A " + ChainOutput + " -j RETURN"},
	} {
		if !logged(logs, found.chain, found.rule, 1) {
			t.Errorf("no log line names %q at position 1 of %s:\n%s", found.rule, found.chain, logText(logs))
		}
		if n := repairs(t, reg, found.chain, DriftForeign); n != 1 {
			t.Errorf("imds_proxy_redirect_repairs_total{chain=%q,kind=\"foreign\"} = %v, want 1", found.chain, n)
		}
	}

	// A second reconcile finds the capture intact and changes nothing.
	before := logs.Len()
	ns.Do(t, func() { m.reconcileOnce() })
	if got := ns.IptablesSave(t, bin+"-save"); got != want || logs.Len() != before {
		t.Errorf("a second reconcile changed something:\n%s\nlogged:\n%s", got, logText(logs))
	}
}

// TestReconcileKeepsHostHooksAbove: on a node, CNIs and kube-proxy keep
// their jumps into their own chains at the top of the built-in chains; such
// a jump above the proxy's stays there, reconcile after reconcile, while a
// foreign verdict above the proxy's guard is moved below it.
func TestReconcileKeepsHostHooksAbove(t *testing.T) {
	for _, backend := range []Backend{BackendNFT, BackendLegacy} {
		t.Run(string(backend), func(t *testing.T) {
			ns := testutil.NewNetns(t)
			bin := "iptables-" + string(backend)
			for _, r := range unrelatedRules {
				ns.Run(t, append([]string{bin}, r...)...)
			}
			ns.Run(t, bin, "-t", "nat", "-N", "CNI-HOOK")
			ns.Run(t, bin, "-t", "filter", "-N", "CNI-HOOK")
			core, logs := observer.New(zap.InfoLevel)
			var m *Manager
			ns.Do(t, func() { m = installedManager(t, nodeConfig(), backend, true, zap.New(core)) })
			installed := ns.IptablesSave(t, bin+"-save")
			ns.Run(t, bin, "-t", "nat", "-I", "PREROUTING", "1", "-j", "CNI-HOOK")
			ns.Run(t, bin, "-t", "filter", "-I", "INPUT", "1", "-j", "CNI-HOOK")
			const accept = "-A INPUT -p tcp -m tcp --dport 8169 -j ACCEPT"
			ns.Run(t, bin, "-t", "filter", "-I", "INPUT", "1", "-p", "tcp", "--dport", "8169", "-j", "ACCEPT")

			want := withLineAfter(t, installed, ":CNI-HOOK - [0:0]\n:IMDS_PROXY_PREROUTING - [0:0]", "-A PREROUTING -j CNI-HOOK")
			want = withLineAfter(t, want, "-j "+ChainInput, accept)
			want = withLineAfter(t, want, accept, "-A INPUT -j CNI-HOOK")
			for round := 1; round <= 2; round++ {
				var ready error
				ns.Do(t, func() {
					m.reconcileOnce()
					ready = m.Ready()
				})
				if got := ns.IptablesSave(t, bin+"-save"); got != want {
					t.Errorf("after reconcile %d:\n%s\nwant the hooks left above and the ACCEPT below the guard:\n%s", round, got, want)
				}
				// The node address is no address of this namespace: only
				// the delivery check may keep the manager from ready.
				if ready == nil || !strings.Contains(ready.Error(), "not an address of this host") {
					t.Errorf("Ready after reconcile %d = %v; want only the delivery check failing", round, ready)
				}
			}
			if errs := logs.FilterLevelExact(zap.ErrorLevel).FilterMessageSnippet("iptables"); errs.Len() > 0 {
				t.Errorf("reconcile logged errors:\n%s", logText(errs))
			}
			if n := logs.FilterField(zap.String("kind", string(DriftForeign))).Len(); n != 1 || !logged(logs, "INPUT", accept, 1) {
				t.Errorf("want exactly one foreign rule logged, the ACCEPT at INPUT 1; logged:\n%s", logText(logs))
			}
		})
	}
}

// TestNotReadyUntilCaptureRestored: while a repair fails, the manager is
// not ready and says what it found; the next repair makes it ready.
func TestNotReadyUntilCaptureRestored(t *testing.T) {
	ns := testutil.NewNetns(t)
	var m *Manager
	ns.Do(t, func() { m = installedManager(t, sidecarConfig(), BackendNFT, true, zap.NewNop()) })
	for _, r := range shadowingRules {
		ns.Run(t, append([]string{"iptables-nft"}, r...)...)
	}
	restore := m.tables[0].restorePath
	m.tables[0].restorePath = "/bin/false"
	var failing, repaired error
	ns.Do(t, func() {
		m.reconcileOnce()
		failing = m.Ready()
		m.tables[0].restorePath = restore
		m.reconcileOnce()
		repaired = m.Ready()
	})
	if failing == nil || !strings.Contains(failing.Error(), "-j ACCEPT") {
		t.Errorf("Ready while the repair fails = %v; want not ready, naming the ACCEPT above the jump", failing)
	}
	if repaired != nil {
		t.Errorf("Ready after the repair = %v", repaired)
	}
}

// installedManager installs cfg's IPv4 rules with backend, in one batch or
// rule by rule.
func installedManager(t *testing.T, cfg Config, backend Backend, batch bool, log *zap.Logger, opts ...Option) *Manager {
	t.Helper()
	m, err := NewManager(cfg, backend, []Family{IPv4}, log, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if batch && m.tables[0].restorePath == "" {
		t.Fatalf("no %s restore binary: the batch path would go untested", backend)
	}
	if !batch {
		m.tables[0].restorePath = ""
	}
	if err := m.Install(); err != nil {
		t.Fatal(err)
	}
	return m
}

// withLineAfter returns save with line inserted after the first place where
// a line ends with suffix.
func withLineAfter(t *testing.T, save, suffix, line string) string {
	t.Helper()
	i := strings.Index(save, suffix+"\n")
	if i < 0 {
		t.Fatalf("no line ends with %q in:\n%s", suffix, save)
	}
	i += len(suffix) + 1
	return save[:i] + line + "\n" + save[i:]
}

// repairs is imds_proxy_redirect_repairs_total{chain,kind} in reg, summed
// over families.
func repairs(t *testing.T, reg *prometheus.Registry, chain string, kind DriftKind) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range families {
		if f.GetName() != "imds_proxy_redirect_repairs_total" {
			continue
		}
		for _, metric := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range metric.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["chain"] == chain && labels["kind"] == string(kind) {
				sum += metric.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// logged reports whether an entry names rule at position in chain.
func logged(logs *observer.ObservedLogs, chain, rule string, position int) bool {
	for _, e := range logs.All() {
		f := e.ContextMap()
		if f["chain"] == chain && f["rule"] == rule && f["position"] == int64(position) {
			return true
		}
	}
	return false
}

func logText(logs *observer.ObservedLogs) string {
	var b strings.Builder
	for _, e := range logs.All() {
		fmt.Fprintf(&b, "%s %s %v\n", e.Level, e.Message, e.ContextMap())
	}
	return b.String()
}
