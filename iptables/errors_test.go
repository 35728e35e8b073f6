package iptables

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

func TestMissingBinaryIsExplained(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := Open(IPv4, BackendNFT)
	if err == nil || !strings.Contains(err.Error(), "install the iptables package") {
		t.Errorf("Open without iptables: %v, want advice to install the package", err)
	}
}

// TestAutoBackendFollowsTheHost: legacy when legacy tables hold rules, nft
// otherwise, as Istio decides.
func TestAutoBackendFollowsTheHost(t *testing.T) {
	ns := testutil.NewNetns(t)
	var before, after Backend
	ns.Do(t, func() { before = detectBackend(IPv4) })
	ns.Run(t, "iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "udp", "-j", "ACCEPT")
	ns.Do(t, func() { after = detectBackend(IPv4) })
	if before != BackendNFT || after != BackendLegacy {
		t.Errorf("auto backend: %s with empty legacy tables, %s with a legacy rule; want nft, legacy", before, after)
	}
}

// TestNoNetAdminIsExplainedAndLeavesNothing runs install without
// capabilities: it must fail saying NET_ADMIN is needed.
func TestNoNetAdminIsExplainedAndLeavesNothing(t *testing.T) {
	ns := testutil.NewNetns(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatalf("setpriv (util-linux) is needed to drop capabilities: %v", err)
	}
	before := ns.IptablesSave(t, "iptables-nft-save")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := ns.Command("setpriv", "--inh-caps=-all", "--bounding-set=-all", exe, "-test.v", "-test.run=^TestHelperInstallSidecar$")
	cmd.Env = append(os.Environ(), "IMDS_PROXY_TEST_HELPER=1")
	out, _ := cmd.CombinedOutput()
	if !strings.Contains(string(out), "NET_ADMIN") {
		t.Errorf("install without NET_ADMIN said:\n%s\nwant it to name NET_ADMIN", out)
	}
	if after := ns.IptablesSave(t, "iptables-nft-save"); after != before {
		t.Errorf("a failed install left rules behind:\n%s", after)
	}
}

// TestHelperInstallSidecar is run by the test above in a process without
// capabilities; on its own it does nothing.
func TestHelperInstallSidecar(t *testing.T) {
	if os.Getenv("IMDS_PROXY_TEST_HELPER") != "1" {
		return
	}
	m, err := NewManager(sidecarConfig(), BackendNFT, []Family{IPv4}, zap.NewNop())
	if err == nil {
		err = m.Install()
	}
	if err == nil {
		t.Fatal("install without capabilities succeeded")
	}
	t.Log(err)
}
