// Package iptables owns the nat (and, in node mode, filter) rules that send
// IMDS traffic to imds-proxy.
//
// Every rule lives in the proxy's own chains; the built-in chains get exactly
// one jump each, so removal deletes those jumps and the proxy's chains and
// touches nothing else. Every rule carries a comment naming imds-proxy.
package iptables

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// Family is an IP family, each with its own iptables binary.
type Family string

// Families.
const (
	IPv4 Family = "ipv4"
	IPv6 Family = "ipv6"
)

// The IMDS endpoints, and the chains this package owns.
const (
	IMDSv4 = imdsapi.AddrV4 + "/32"
	IMDSv6 = imdsapi.AddrV6 + "/128"

	ChainOutput     = "IMDS_PROXY_OUTPUT"
	ChainPrerouting = "IMDS_PROXY_PREROUTING"
	ChainInput      = "IMDS_PROXY_INPUT"

	commentPrefix = "imds-proxy: "
)

// Config is everything the rules depend on.
type Config struct {
	Mode imdsapi.Mode
	// ProxyPort is the port the proxy listens on, the redirect target.
	ProxyPort int
	// ExemptCgroup (sidecar) exempts the sockets of processes in this
	// cgroup v2 path (OwnCgroup): the one exemption an app container cannot
	// forge with the runtime's default capabilities. "" disables it.
	ExemptCgroup string
	// ExemptMark (sidecar) is the socket mark the proxy sets on its upstream
	// connections; they are not redirected. Since Linux 5.17 any process
	// with NET_RAW, a default capability of Docker and containerd, can set
	// it: a fallback where ExemptCgroup cannot be used. 0 disables it.
	ExemptMark uint32
	// ExemptUID (sidecar) exempts connections of this UID instead, for when an
	// init container installs the rules and the proxy runs without NET_ADMIN.
	// A root process with CAP_SETUID (a default capability) can take the
	// UID. Negative disables it.
	ExemptUID int
	// Interfaces (node) are the container-facing interfaces, iptables
	// wildcards allowed (cni+, eni+, veth+).
	Interfaces []string
	// NodeAddress (node) is the IPv4 address IMDS traffic from containers
	// is sent to (DNAT): an address of the node's own, so the traffic is
	// delivered locally whatever interface it arrived on
	// (ResolveNodeAddress finds one).
	NodeAddress netip.Addr
}

// Validate says what is wrong with the configuration.
func (c Config) Validate() error {
	if c.ProxyPort < 1 || c.ProxyPort > 65535 {
		return fmt.Errorf("proxy port %d is not a TCP port", c.ProxyPort)
	}
	switch c.Mode {
	case imdsapi.ModeSidecar:
		if c.ExemptCgroup == "" && c.ExemptMark == 0 && c.ExemptUID < 0 {
			return fmt.Errorf("sidecar mode needs an exemption for the proxy's own traffic: its cgroup, a socket mark or a UID")
		}
		if c.ExemptCgroup != "" && (!strings.HasPrefix(c.ExemptCgroup, "/") || strings.ContainsAny(c.ExemptCgroup, "\n\"")) {
			return fmt.Errorf("cgroup path %q is not an absolute cgroup v2 path", c.ExemptCgroup)
		}
		if c.ExemptUID == 0 {
			return fmt.Errorf("exempting UID 0 would let every root process in the namespace bypass the proxy: run the proxy as a dedicated UID")
		}
	case imdsapi.ModeNode:
		if len(c.Interfaces) == 0 {
			return fmt.Errorf("node mode needs the container-facing interfaces (e.g. docker0,cni+,eni+)")
		}
		for _, name := range c.Interfaces {
			if !validInterface(name) {
				return fmt.Errorf("interface %q is not a valid interface name or wildcard", name)
			}
		}
		if !c.NodeAddress.Is4() || c.NodeAddress.IsLoopback() || c.NodeAddress.IsUnspecified() {
			return fmt.Errorf("node mode needs an IPv4 address of the node, not loopback, to send IMDS traffic to (--node-address); got %q", c.NodeAddress)
		}
	default:
		return fmt.Errorf("unknown mode %q: want sidecar or node", c.Mode)
	}
	return nil
}

func validInterface(name string) bool {
	base := strings.TrimSuffix(name, "+")
	if base == "" || len(base) > 15 {
		return false
	}
	return !strings.ContainsAny(base, " \t/+!\"'")
}

// Rule is one iptables rule.
type Rule struct {
	Table, Chain string
	Spec         []string
}

// Chain is one chain this package owns.
type Chain struct{ Table, Name string }

// Ruleset is the complete set of rules for one family: the proxy's own
// chains with their rules, and the jumps into them from built-in chains.
type Ruleset struct {
	Family Family
	Chains []Chain
	Rules  []Rule // in the proxy's chains, in order
	Jumps  []Rule // one per built-in chain, inserted first
}

// Build returns the ruleset for cfg and family.
func Build(cfg Config, family Family) Ruleset {
	imds := IMDSv4
	if family == IPv6 {
		imds = IMDSv6
	}
	if cfg.Mode == imdsapi.ModeNode {
		return buildNode(cfg, family, imds)
	}
	return buildSidecar(cfg, family, imds)
}

func buildSidecar(cfg Config, family Family, imds string) Ruleset {
	rs := Ruleset{Family: family, Chains: []Chain{{"nat", ChainOutput}}}
	rs.Jumps = append(rs.Jumps, rule("nat", "OUTPUT", "send IMDS traffic to the sidecar chain",
		"-d", imds, "-p", "tcp", "-m", "tcp", "--dport", "80", "-j", ChainOutput))
	if cfg.ExemptCgroup != "" {
		rs.Rules = append(rs.Rules, rule("nat", ChainOutput, "the proxy's own cgroup goes straight to IMDS",
			"-m", "cgroup", "--path", cfg.ExemptCgroup, "-j", "RETURN"))
	}
	if cfg.ExemptMark != 0 {
		mark := fmt.Sprintf("0x%x/0xffffffff", cfg.ExemptMark) // exact: no other component's mark matches
		rs.Rules = append(rs.Rules, rule("nat", ChainOutput, "the proxy's own upstream connections go straight to IMDS",
			"-m", "mark", "--mark", mark, "-j", "RETURN"))
	}
	if cfg.ExemptUID >= 0 {
		rs.Rules = append(rs.Rules, rule("nat", ChainOutput, "the proxy's UID goes straight to IMDS",
			"-m", "owner", "--uid-owner", strconv.Itoa(cfg.ExemptUID), "-j", "RETURN"))
	}
	rs.Rules = append(rs.Rules, rule("nat", ChainOutput, "redirect IMDS to the sidecar",
		"-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(cfg.ProxyPort)))
	return rs
}

func buildNode(cfg Config, family Family, imds string) Ruleset {
	port := strconv.Itoa(cfg.ProxyPort)
	rs := Ruleset{Family: family, Chains: []Chain{{"nat", ChainPrerouting}, {"filter", ChainInput}}}
	rs.Jumps = append(rs.Jumps,
		rule("nat", "PREROUTING", "send IMDS traffic to the node chain",
			"-d", imds, "-p", "tcp", "-m", "tcp", "--dport", "80", "-j", ChainPrerouting),
		rule("filter", "INPUT", "guard the node listener",
			"-p", "tcp", "-m", "tcp", "--dport", port, "-j", ChainInput))
	// DNAT to an address of the node, not REDIRECT: REDIRECT sends to the
	// incoming interface's first address and drops the packet when there
	// is none, as on the host veths of the VPC CNI, Calico and Cilium.
	// IPv6 keeps REDIRECT: every IPv6 interface has a link-local address.
	target := []string{"-j", "DNAT", "--to-destination", netip.AddrPortFrom(cfg.NodeAddress, uint16(cfg.ProxyPort)).String()}
	if family == IPv6 {
		target = []string{"-j", "REDIRECT", "--to-ports", port}
	}
	for _, iface := range cfg.Interfaces {
		rs.Rules = append(rs.Rules, rule("nat", ChainPrerouting, "send IMDS from containers on "+iface+" to the node listener",
			append([]string{"-i", iface, "-p", "tcp"}, target...)...))
	}
	rs.Rules = append(rs.Rules, rule("filter", ChainInput, "the node itself may reach the listener",
		"-i", "lo", "-j", "RETURN"))
	for _, iface := range cfg.Interfaces {
		rs.Rules = append(rs.Rules, rule("filter", ChainInput, "containers on "+iface+" may reach the listener",
			"-i", iface, "-j", "RETURN"))
	}
	rs.Rules = append(rs.Rules, rule("filter", ChainInput, "no other interface (the VPC) may reach the listener",
		"-j", "DROP"))
	return rs
}

// rule builds a Rule with its comment placed before the target, where
// iptables-save prints it.
func rule(table, chain, comment string, spec ...string) Rule {
	target := slices.Index(spec, "-j")
	out := append([]string(nil), spec[:target]...)
	out = append(out, "-m", "comment", "--comment", commentPrefix+comment)
	return Rule{Table: table, Chain: chain, Spec: append(out, spec[target:]...)}
}

// Render prints the ruleset as iptables-save-style lines, table by table:
// what `imds-proxy rules show` prints and what install applies.
func (rs Ruleset) Render() string {
	return rs.render(func(r Rule) string { return "-A " + r.Chain })
}

// restoreInput is the `iptables-restore --noflush` input that installs rs in
// one transaction per table: declaring the proxy's chains creates them or
// empties them, their rules follow, and each jump that is not in place yet
// is inserted at the top of its built-in chain.
func (rs Ruleset) restoreInput(jumpInPlace func(Rule) bool) string {
	return rs.render(func(r Rule) string {
		if !strings.HasPrefix(r.Chain, "IMDS_PROXY_") {
			if jumpInPlace(r) {
				return ""
			}
			return "-I " + r.Chain + " 1"
		}
		return "-A " + r.Chain
	})
}

// render prints the chains and rules table by table; verb gives each rule's
// command ("-A CHAIN", "-I CHAIN 1"), or "" to leave it out.
func (rs Ruleset) render(verb func(Rule) string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# %s\n", rs.Family)
	for _, table := range []string{"nat", "filter"} {
		var lines []string
		for _, c := range rs.Chains {
			if c.Table == table {
				lines = append(lines, ":"+c.Name+" - [0:0]")
			}
		}
		for _, r := range append(append([]Rule(nil), rs.Jumps...), rs.Rules...) {
			if v := verb(r); r.Table == table && v != "" {
				lines = append(lines, v+" "+quoteSpec(r.Spec))
			}
		}
		if len(lines) == 0 {
			continue
		}
		fmt.Fprintf(&b, "*%s\n%s\nCOMMIT\n", table, strings.Join(lines, "\n"))
	}
	return b.String()
}

func quoteSpec(spec []string) string {
	out := make([]string, len(spec))
	for i, arg := range spec {
		if strings.ContainsAny(arg, " \t") {
			arg = strconv.Quote(arg)
		}
		out[i] = arg
	}
	return strings.Join(out, " ")
}
