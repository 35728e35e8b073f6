package iptables

import (
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// TestAPIListener: the families a proxy's API listener binds.
func TestAPIListener(t *testing.T) {
	for _, c := range []struct {
		name     string
		l        APIListener
		network  string
		err      string
		loopback bool
	}{
		{"sidecar", APIListener{Mode: imdsapi.ModeSidecar, Addr: "127.0.0.1:8169", IPv6: true, Redirects: true, RedirectsIPv6: true}, "tcp", "", true},
		{"sidecar without IPv6 rules", APIListener{Mode: imdsapi.ModeSidecar, Addr: "127.0.0.1:8169", IPv6: true, Redirects: true}, "tcp", "", false},
		{"sidecar, --ipv6=false", APIListener{Mode: imdsapi.ModeSidecar, Addr: "127.0.0.1:8169", Redirects: true}, "tcp", "", false},
		{"sidecar, init container's rules", APIListener{Mode: imdsapi.ModeSidecar, Addr: "127.0.0.1:8169", IPv6: true}, "tcp", "", true},
		{"sidecar on [::1]", APIListener{Mode: imdsapi.ModeSidecar, Addr: "[::1]:8169", IPv6: true, Redirects: true, RedirectsIPv6: true}, "tcp", "", false},
		{"sidecar on every address", APIListener{Mode: imdsapi.ModeSidecar, Addr: ":8169", IPv6: true, Redirects: true, RedirectsIPv6: true}, "tcp", "", false},
		{"sidecar on a name", APIListener{Mode: imdsapi.ModeSidecar, Addr: "localhost:8169", IPv6: true, Redirects: true, RedirectsIPv6: true}, "tcp", "", false},
		{"node on every address", APIListener{Mode: imdsapi.ModeNode, Addr: ":8169", IPv6: true, Redirects: true, RedirectsIPv6: true}, "tcp", "", false},
		{"node on 0.0.0.0", APIListener{Mode: imdsapi.ModeNode, Addr: "0.0.0.0:8169", IPv6: true, Redirects: true, RedirectsIPv6: true}, "tcp", "", false},
		{"node on [::] without IPv6 rules", APIListener{Mode: imdsapi.ModeNode, Addr: "[::]:8169", IPv6: true, Redirects: true}, "tcp4", "", false},
		{"node on every address without IPv6 rules", APIListener{Mode: imdsapi.ModeNode, Addr: ":8169", Redirects: true}, "tcp4", "", false},
		{"node on every address without rules", APIListener{Mode: imdsapi.ModeNode, Addr: ":8169", IPv6: true}, "", "--listen :8169: without --rules nothing keeps the VPC off", false},
		{"node on its own address without rules", APIListener{Mode: imdsapi.ModeNode, Addr: "10.0.1.10:8169", IPv6: true}, "tcp", "", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			network, err := c.l.Network()
			if network != c.network || !says(err, c.err) || c.l.WantsIPv6Loopback() != c.loopback {
				t.Errorf("network %q, err %v, [::1] %t; want %q, %q, %t", network, err, c.l.WantsIPv6Loopback(), c.network, c.err, c.loopback)
			}
		})
	}
}
