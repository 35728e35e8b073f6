package iptables

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/ti-mo/conntrack"
)

var imdsAddrs = []netip.Addr{netip.MustParseAddr(imdsapi.AddrV4), netip.MustParseAddr(imdsapi.AddrV6)}

// FlushBypassingConnections deletes the conntrack entries of TCP connections
// to IMDS port 80 that are not redirected: connections opened before the
// rules existed. NAT is decided on a connection's first packet, so without
// this a keep-alive connection would bypass the proxy for as long as it
// lives. With its entry gone, the connection's next packet is redirected to
// the proxy, which resets it, and the client reconnects through the proxy.
// It returns how many entries it deleted.
//
// Connections from this namespace's own addresses are kept in node mode,
// where the node's own traffic to IMDS (kubelet, agents) is never redirected.
func FlushBypassingConnections(mode imdsapi.Mode) (int, error) {
	local, err := localAddrs()
	if err != nil {
		return 0, err
	}
	c, err := conntrack.Dial(nil)
	if err != nil {
		return 0, fmt.Errorf("opening conntrack netlink socket: %w", err)
	}
	defer c.Close()
	flows, err := c.Dump(nil)
	if err != nil {
		return 0, fmt.Errorf("listing conntrack entries: %w", err)
	}
	deleted := 0
	for _, f := range flows {
		if !bypassesProxy(f) || (mode == imdsapi.ModeNode && local[f.TupleOrig.IP.SourceAddress]) {
			continue
		}
		if err := c.Delete(f); err != nil {
			return deleted, fmt.Errorf("deleting conntrack entry %s -> %s: %w",
				f.TupleOrig.IP.SourceAddress, f.TupleOrig.IP.DestinationAddress, err)
		}
		deleted++
	}
	return deleted, nil
}

// bypassesProxy: a TCP flow to IMDS port 80 whose reply comes from IMDS
// itself, i.e. one that was not redirected.
func bypassesProxy(f conntrack.Flow) bool {
	orig, reply := f.TupleOrig, f.TupleReply
	if orig.Proto.Protocol != 6 || orig.Proto.DestinationPort != 80 {
		return false
	}
	for _, imds := range imdsAddrs {
		if orig.IP.DestinationAddress == imds && reply.IP.SourceAddress == imds {
			return true
		}
	}
	return false
}

// localAddrs returns the addresses of this namespace's interfaces.
func localAddrs() (map[netip.Addr]bool, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("listing local addresses: %w", err)
	}
	local := map[netip.Addr]bool{}
	for _, a := range addrs {
		if prefix, err := netip.ParsePrefix(a.String()); err == nil {
			local[prefix.Addr().Unmap()] = true
		}
	}
	return local, nil
}
