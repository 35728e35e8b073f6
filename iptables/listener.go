package iptables

import (
	"fmt"
	"net"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// APIListener is the proxy's IMDS listener as its redirect needs it bound.
type APIListener struct {
	Mode imdsapi.Mode
	// Addr is where it listens (--listen).
	Addr string
	// IPv6 says IMDS over IPv6 is to be redirected too (--ipv6).
	IPv6 bool
	// Redirects says the proxy installs the redirect itself (--rules).
	Redirects bool
	// RedirectsIPv6 says its own rules include the IPv6 ones
	// (Manager.Manages(IPv6)).
	RedirectsIPv6 bool
}

// Network is "tcp", or "tcp4" for a node agent on a wildcard address
// without IPv6 rules: it binds only the families whose filter guard is
// installed, so the VPC never reaches it. A node agent on every address
// without rules of its own is refused.
func (l APIListener) Network() (string, error) {
	host, _, _ := net.SplitHostPort(l.Addr)
	wildcard := host == "" || host == "0.0.0.0" || host == "::"
	if l.Mode != imdsapi.ModeNode || !wildcard {
		return "tcp", nil
	}
	if !l.Redirects {
		return "", fmt.Errorf("--listen %s: without --rules nothing keeps the VPC off a node agent on "+
			"every address; listen on a container-facing address instead", l.Addr)
	}
	if !l.RedirectsIPv6 {
		return "tcp4", nil
	}
	return "tcp", nil
}

// WantsIPv6Loopback says whether a sidecar on an IPv4 address should also
// listen on [::1], where ip6tables REDIRECT delivers: when its own IPv6
// rules redirect there, or, without rules of its own, when an init
// container's `rules install` may have.
func (l APIListener) WantsIPv6Loopback() bool {
	host, _, _ := net.SplitHostPort(l.Addr)
	ip := net.ParseIP(host)
	if l.Mode != imdsapi.ModeSidecar || !l.IPv6 || ip == nil || ip.To4() == nil {
		return false
	}
	return !l.Redirects || l.RedirectsIPv6
}
