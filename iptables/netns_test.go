package iptables

import (
	"fmt"
	"strings"
	"testing"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// unrelatedRules are someone else's rules in the chains imds-proxy jumps
// from; they must survive install and remove untouched.
var unrelatedRules = [][]string{
	{"-t", "nat", "-A", "OUTPUT", "-d", "10.0.0.1/32", "-p", "tcp", "-j", "RETURN"},
	{"-t", "nat", "-A", "PREROUTING", "-d", "10.0.0.2/32", "-p", "tcp", "-j", "RETURN"},
	{"-t", "filter", "-A", "INPUT", "-p", "udp", "--dport", "53", "-j", "ACCEPT"},
}

// TestInstallIsIdempotentAndRemoveRestores runs real iptables of each backend
// in a throw-away namespace, applying in one batch (iptables-restore) and rule
// by rule: install twice gives one ruleset, a deleted rule is reported
// missing and restored by installing again, and remove leaves iptables-save
// exactly as it was.
func TestInstallIsIdempotentAndRemoveRestores(t *testing.T) {
	for _, backend := range []Backend{BackendNFT, BackendLegacy} {
		for _, cfg := range []Config{sidecarConfig(), nodeConfig()} {
			for _, batch := range []bool{true, false} {
				name := fmt.Sprintf("%s/%s/batch=%t", backend, cfg.Mode, batch)
				t.Run(name, func(t *testing.T) { testInstallRemove(t, backend, cfg, batch) })
			}
		}
	}
}

func testInstallRemove(t *testing.T, backend Backend, cfg Config, batch bool) {
	ns := testutil.NewNetns(t)
	bin := "iptables-" + string(backend)
	for _, r := range unrelatedRules {
		ns.Run(t, append([]string{bin}, r...)...)
	}
	save := bin + "-save"
	before := ns.IptablesSave(t, save)
	rs := Build(cfg, IPv4)

	var installed, again, restored, removed string
	ns.Do(t, func() {
		table := openForTest(t, backend, batch)
		mustInstall(t, table, rs)
		installed = ns.IptablesSave(t, save)
		mustInstall(t, table, rs)
		again = ns.IptablesSave(t, save)

		victim := rs.Rules[len(rs.Rules)-1]
		ns.Run(t, append([]string{bin, "-t", victim.Table, "-D", victim.Chain}, victim.Spec...)...)
		drifts, err := table.Check(rs)
		if err != nil || len(drifts) != 1 || drifts[0].Kind != DriftMissing || !printedAs(victim, drifts[0].Rule) {
			t.Errorf("after deleting one rule, Check = %+v, %v; want that rule missing", drifts, err)
		}
		mustInstall(t, table, rs)
		restored = ns.IptablesSave(t, save)

		// A racing second install and a stale jump from another port must
		// not keep remove from deleting the chains.
		for _, j := range rs.Jumps {
			ns.Run(t, append([]string{bin, "-t", j.Table, "-I", j.Chain, "1"}, j.Spec...)...)
			stale := append([]string{bin, "-t", j.Table, "-A", j.Chain, "-p", "tcp", "-m", "tcp", "--dport", "9999", "-j"}, jumpTarget(j).Name)
			ns.Run(t, stale...)
		}
		if err := table.Remove(rs); err != nil {
			t.Fatal(err)
		}
		removed = ns.IptablesSave(t, save)
		if err := table.Remove(rs); err != nil {
			t.Errorf("removing twice: %v", err)
		}
	})
	if want := len(rs.Rules) + len(rs.Jumps); strings.Count(installed, "imds-proxy: ") != want {
		t.Errorf("installed ruleset has %d imds-proxy rules, want %d:\n%s", strings.Count(installed, "imds-proxy: "), want, installed)
	}
	if again != installed {
		t.Errorf("install twice differs from install once:\n%s\nvs\n%s", again, installed)
	}
	if restored != installed {
		t.Errorf("reinstall after a deleted rule differs:\n%s\nvs\n%s", restored, installed)
	}
	if removed != before {
		t.Errorf("remove did not restore the namespace:\nbefore:\n%s\nafter:\n%s", before, removed)
	}
}

// openForTest opens the IPv4 table of backend, applying in one batch or rule
// by rule.
func openForTest(t *testing.T, backend Backend, batch bool) *Table {
	t.Helper()
	table, err := Open(IPv4, backend)
	if err != nil {
		t.Fatal(err)
	}
	if batch && table.restorePath == "" {
		t.Fatalf("no %s restore binary: the batch path would go untested", backend)
	}
	if !batch {
		table.restorePath = ""
	}
	return table
}

func mustInstall(t *testing.T, table *Table, rs Ruleset) {
	t.Helper()
	if err := table.Install(rs); err != nil {
		t.Fatal(err)
	}
}
