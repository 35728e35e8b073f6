package iptables

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestIPv6FailsClosed: where ip6tables cannot install the IPv6 redirect, a
// namespace that can reach [fd00:ec2::254] is not ready (its IPv6 IMDS
// traffic would bypass the proxy), and one without IPv6 stays ready.
func TestIPv6FailsClosed(t *testing.T) {
	for _, tc := range []struct {
		name string
		// path is the PATH ip6tables is looked up in.
		path func(t *testing.T) string
		// ipv6 gives the namespace an IPv6 route to IMDS, or disables IPv6.
		ipv6      bool
		wantReady bool
	}{
		{"nat table unavailable", natlessIP6tables, true, false},
		{"ip6tables missing", withoutIP6tables, true, false},
		{"nat table unavailable, IPv6 disabled", natlessIP6tables, false, true},
		{"ip6tables missing, IPv6 disabled", withoutIP6tables, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := testutil.NewNetns(t)
			ns.Run(t, "ip", "link", "add", "veth-task", "type", "veth", "peer", "name", "veth-peer")
			ns.Run(t, "ip", "link", "set", "veth-task", "up")
			if tc.ipv6 {
				ns.Run(t, "ip", "-6", "addr", "add", "fd00:ec2::2/64", "dev", "veth-task", "nodad")
			} else {
				ns.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
			}
			t.Setenv("PATH", tc.path(t))
			var readyErr error
			ns.Do(t, func() {
				m, err := NewManager(sidecarConfig(), BackendNFT, []Family{IPv4, IPv6}, zap.NewNop())
				if err != nil {
					t.Fatal(err)
				}
				if m.Manages(IPv6) {
					t.Fatal("the manager claims IPv6 with a broken ip6tables")
				}
				if err := m.Install(); err != nil {
					t.Fatal(err)
				}
				readyErr = m.Ready()
			})
			switch {
			case tc.wantReady && readyErr != nil:
				t.Errorf("without IPv6 in the namespace, Ready = %v; want ready", readyErr)
			case !tc.wantReady && readyErr == nil:
				t.Error("Ready = nil while [fd00:ec2::254] is reachable and not redirected; want not ready")
			case !tc.wantReady && !strings.Contains(readyErr.Error(), "fd00:ec2::254"):
				t.Errorf("Ready = %v; want the reason to name fd00:ec2::254", readyErr)
			}
		})
	}
}

// natlessIP6tables is a PATH whose ip6tables has no nat table, as on a node
// without the ip6table_nat module (testdata/ip6tables-nat-unavailable).
func natlessIP6tables(t *testing.T) string {
	dir, err := filepath.Abs(filepath.Join("testdata", "ip6tables-nat-unavailable"))
	if err != nil {
		t.Fatal(err)
	}
	return dir + string(os.PathListSeparator) + os.Getenv("PATH")
}

// withoutIP6tables is a PATH holding only the IPv4 iptables binaries, as an
// image with the iptables package but not ip6tables.
func withoutIP6tables(t *testing.T) string {
	dir := t.TempDir()
	for _, name := range []string{"iptables-nft", "iptables-nft-restore", "iptables-nft-save"} {
		path, err := exec.LookPath(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(path, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestIPv6RouteLaterMakesNotReady: readiness follows the namespace's routes,
// so a route to [fd00:ec2::254] added after start, with no IPv6 redirect,
// makes the manager not ready.
func TestIPv6RouteLaterMakesNotReady(t *testing.T) {
	ns := testutil.NewNetns(t)
	ns.Run(t, "ip", "link", "add", "veth-task", "type", "veth", "peer", "name", "veth-peer")
	ns.Run(t, "ip", "link", "set", "veth-task", "up")
	t.Setenv("PATH", natlessIP6tables(t))
	var before, after error
	ns.Do(t, func() {
		m, err := NewManager(sidecarConfig(), BackendNFT, []Family{IPv4, IPv6}, zap.NewNop())
		if err == nil {
			err = m.Install()
		}
		if err != nil {
			t.Fatal(err)
		}
		before = m.Ready()
		ns.Run(t, "ip", "-6", "addr", "add", "fd00:ec2::2/64", "dev", "veth-task", "nodad")
		after = m.Ready()
	})
	if before != nil || after == nil {
		t.Errorf("Ready before the IPv6 route = %v, after = %v; want ready, then not ready", before, after)
	}
}
