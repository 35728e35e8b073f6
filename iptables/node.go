package iptables

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// NodeAddressAuto asks ResolveNodeAddress to find the node's address itself.
const NodeAddressAuto = "auto"

// ResolveNodeAddress is where the node rules send IMDS traffic: an IPv4
// address this namespace owns, named by value (--node-address), or with
// NodeAddressAuto the address --listen names, else the source address the
// node uses towards upstream (on EC2: the primary ENI address). REDIRECT
// cannot be used: it sends to the incoming interface's first address, and
// the host veths of the VPC CNI, Calico and Cilium have none. A loopback
// address is refused: reaching it from another interface needs
// route_localnet, which exposes every loopback service to the containers.
func ResolveNodeAddress(value, listenHost, upstreamHost string) (netip.Addr, error) {
	if value == "" || value == NodeAddressAuto {
		if ip, err := netip.ParseAddr(listenHost); err == nil && !ip.IsUnspecified() {
			value = listenHost
		} else {
			src, err := routeSource(upstreamHost)
			if err != nil {
				return netip.Addr{}, fmt.Errorf("--node-address auto: %w; name an IPv4 address of this node", err)
			}
			value = src.String()
		}
	}
	addr, err := netip.ParseAddr(value)
	if err != nil || !addr.Is4() {
		return netip.Addr{}, fmt.Errorf("--node-address %q: want an IPv4 address of this node", value)
	}
	if addr.IsLoopback() || addr.IsUnspecified() || addr.IsMulticast() {
		return netip.Addr{}, fmt.Errorf("--node-address %s: containers cannot be sent to a loopback or unspecified "+
			"address (it would need route_localnet); name an address the node owns on a real interface", addr)
	}
	return addr, nil
}

// routeSource is the source address the kernel picks towards host (IMDS if
// host is not an IPv4 address). Connecting a UDP socket sends nothing.
func routeSource(host string) (netip.Addr, error) {
	if ip, err := netip.ParseAddr(host); err != nil || !ip.Is4() {
		host = strings.TrimSuffix(IMDSv4, "/32")
	}
	c, err := net.Dial("udp4", net.JoinHostPort(host, "80"))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("no route to %s: %w", host, err)
	}
	defer c.Close()
	src := c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap()
	if src.IsLoopback() {
		return netip.Addr{}, fmt.Errorf("the node reaches %s over loopback", host)
	}
	return src, nil
}

// CheckDelivery reports why traffic sent to addr would not reach the
// listener: addr is no longer an address of this namespace, or nothing
// accepts connections there.
func CheckDelivery(addr netip.AddrPort) error {
	local, err := localAddrs()
	if err != nil {
		return err
	}
	if !local[addr.Addr()] {
		return fmt.Errorf("the node address %s is not an address of this host any more: "+
			"redirected IMDS traffic would be dropped (set --node-address, or restart to detect it again)", addr.Addr())
	}
	c, err := net.DialTimeout("tcp", addr.String(), time.Second)
	if err != nil {
		return fmt.Errorf("the listener does not accept connections at %s, where the redirect sends IMDS traffic: %w", addr, err)
	}
	return c.Close()
}

// MatchInterfaces returns, for each pattern (an interface name, or an
// iptables wildcard ending in +), the interfaces of this namespace it
// matches, sorted.
func MatchInterfaces(patterns []string) (map[string][]string, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("listing network interfaces: %w", err)
	}
	return matchInterfaces(patterns, ifaces), nil
}

func matchInterfaces(patterns []string, ifaces []net.Interface) map[string][]string {
	matches := map[string][]string{}
	for _, pattern := range patterns {
		matches[pattern] = []string{}
		for _, iface := range ifaces {
			if InterfaceMatches(pattern, iface.Name) {
				matches[pattern] = append(matches[pattern], iface.Name)
			}
		}
		slices.Sort(matches[pattern])
	}
	return matches
}

// InterfaceMatches applies iptables' -i semantics: a trailing + matches any
// name with that prefix; otherwise the name must be equal.
func InterfaceMatches(pattern, name string) bool {
	if prefix, ok := strings.CutSuffix(pattern, "+"); ok {
		return strings.HasPrefix(name, prefix)
	}
	return pattern == name
}

// NodeRule is one container-facing rule of an installed node chain, as
// imds-proxy doctor reads it back.
type NodeRule struct {
	// Interface is the -i pattern; Target is "DNAT" or "REDIRECT";
	// Destination is DNAT's address:port.
	Interface, Target, Destination string
}

// InstalledNodeRules reads the IPv4 node chain in this namespace (auto
// backend): nil without one. It needs NET_ADMIN or root.
func InstalledNodeRules() ([]NodeRule, error) {
	lines, err := installedChain(ChainPrerouting)
	if err != nil || lines == nil {
		return nil, err
	}
	var rules []NodeRule
	for _, line := range lines {
		if r, ok := parseNodeRule(strings.Fields(line)); ok {
			rules = append(rules, r)
		}
	}
	return rules, nil
}

// parseNodeRule reads the -i, -j and --to-destination of one
// `iptables -S` line.
func parseNodeRule(fields []string) (NodeRule, bool) {
	var r NodeRule
	for i := 0; i+1 < len(fields); i++ {
		switch fields[i] {
		case "-i":
			r.Interface = fields[i+1]
		case "-j":
			r.Target = fields[i+1]
		case "--to-destination":
			r.Destination = fields[i+1]
		}
	}
	return r, r.Interface != "" && r.Target != ""
}

// NodeInspection is what a node agent's rules in this namespace would do:
// what imds-proxy doctor reports when run on the node.
type NodeInspection struct {
	Rules []NodeRule `json:"rules"`
	// Matches maps each -i pattern to the interfaces it matches now.
	Matches map[string][]string `json:"matches"`
	// Unmatched are this namespace's interfaces (lo aside) that no pattern
	// matches: a container interface among them bypasses the proxy.
	Unmatched []string `json:"unmatched_interfaces,omitempty"`
	// Problems say why containers' IMDS traffic would not reach the proxy.
	Problems []string `json:"problems,omitempty"`
}

// InspectNode reads the node chain installed here, if any (nil without
// one), and checks that what it sends would reach a listener.
func InspectNode() (*NodeInspection, error) {
	rules, err := InstalledNodeRules()
	if err != nil || rules == nil {
		return nil, err
	}
	in := &NodeInspection{Rules: rules}
	var patterns []string
	for _, r := range rules {
		patterns = append(patterns, r.Interface)
	}
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("listing network interfaces: %w", err)
	}
	in.Matches = matchInterfaces(patterns, ifaces)
	addressless := map[string]bool{}
	for _, iface := range ifaces {
		addrs, _ := iface.Addrs()
		addressless[iface.Name] = !slices.ContainsFunc(addrs, func(a net.Addr) bool {
			p, err := netip.ParsePrefix(a.String())
			return err == nil && p.Addr().Is4()
		})
		if iface.Name != "lo" && !slices.ContainsFunc(patterns, func(p string) bool { return InterfaceMatches(p, iface.Name) }) {
			in.Unmatched = append(in.Unmatched, iface.Name)
		}
	}
	matched := 0
	checked := map[string]bool{}
	for _, r := range rules {
		matched += len(in.Matches[r.Interface])
		switch r.Target {
		case "REDIRECT":
			for _, name := range in.Matches[r.Interface] {
				if addressless[name] {
					in.Problems = append(in.Problems, fmt.Sprintf("REDIRECT drops IMDS traffic arriving on %s: it has no IPv4 address "+
						"(as the VPC CNI, Calico and Cilium wire pods); an older imds-proxy installed this rule: run this version", name))
				}
			}
		case "DNAT":
			if checked[r.Destination] {
				continue
			}
			checked[r.Destination] = true
			dst, err := netip.ParseAddrPort(r.Destination)
			if err == nil {
				err = CheckDelivery(dst)
			}
			if err != nil {
				in.Problems = append(in.Problems, fmt.Sprintf("IMDS traffic is sent to %s, which does not reach the proxy: %v", r.Destination, err))
			}
		}
	}
	if matched == 0 {
		in.Problems = append(in.Problems, fmt.Sprintf("no --interfaces pattern (%s) matches an interface here: "+
			"no container's IMDS traffic is redirected (interfaces here: %s)", strings.Join(patterns, ","), strings.Join(in.Unmatched, ",")))
	}
	return in, nil
}
