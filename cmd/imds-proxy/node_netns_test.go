package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestNodeRedirectsContainersOnly runs `imds-proxy node` in the node
// namespace: a container's IMDS traffic is redirected to it, the listener
// cannot be reached from the VPC side, and SIGTERM leaves iptables as found.
func TestNodeRedirectsContainersOnly(t *testing.T) {
	e := testutil.NewEC2(t, testutil.WithVPC())
	const imds = "169.254.169.254:80"
	if status, _ := e.Task.Get(t, imds, "/latest/meta-data/instance-id", nil); status != 401 {
		t.Fatalf("control: the container reaches IMDS through the node and tokenless gets %d, want 401", status)
	}
	for _, table := range []string{"nat", "filter"} {
		e.Node.Run(t, "iptables-nft", "-t", table, "-A", "INPUT", "-p", "udp", "-j", "RETURN")
		e.Node.Run(t, "ip6tables-nft", "-t", table, "-A", "INPUT", "-p", "udp", "-j", "RETURN")
	}
	before := saveRules(t, e.Node)

	// The admin listener's default: a node agent must keep it off the VPC and the pods.
	proxy := testutil.StartProxy(t, e.Node, binary, nodeArgs("--interfaces", "cveth+", "--iptables-backend", "nft"))

	if status, body := e.Task.Get(t, imds, "/latest/meta-data/instance-id", nil); status != 200 || body != "i-1234567890abcdef0" {
		t.Errorf("container's tokenless GET through the node agent: %d %q, want 200 and the instance id", status, body)
	}
	runSDK(t, e.Task, "http://169.254.169.254")
	for _, addr := range []string{"10.200.2.1:8169", "10.200.1.1:8169", "[fd00:200:2::1]:8169"} {
		if err := e.VPC.TryDial(t, addr); err == nil {
			t.Errorf("the node listener %s is reachable from the VPC side", addr)
		}
	}
	if err := e.Task.TryDial(t, "10.200.1.1:8169"); err != nil {
		t.Errorf("a container cannot reach the node listener directly: %v", err)
	}
	for _, from := range []*testutil.Netns{e.Task, e.VPC} {
		for _, addr := range []string{"10.200.1.1:9169", "10.200.2.1:9169", "169.254.0.1:9169", "[fd00:200:2::1]:9169"} {
			if err := from.TryDial(t, addr); err == nil {
				t.Errorf("the node agent's admin listener (/v1-callers, /metrics) is reachable from %s at %s", from, addr)
			}
		}
	}

	proxy.Terminate(t)
	if after := saveRules(t, e.Node); after != before {
		t.Errorf("iptables after SIGTERM differ from before start:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestRulesShowMatchesGolden: `rules show` prints the golden rules without
// privileges or an iptables binary.
func TestRulesShowMatchesGolden(t *testing.T) {
	for _, mode := range []string{"sidecar", "node"} {
		cmd := exec.Command(binary, "rules", "show", "--mode", mode)
		if mode == "node" {
			cmd.Args = append(cmd.Args, "--node-address", "10.0.1.10")
		}
		cmd.Env = []string{"PATH=/nonexistent"}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("rules show --mode %s: %v\n%s", mode, err, out)
		}
		var want strings.Builder
		for _, family := range []string{"ipv4", "ipv6"} {
			golden, err := os.ReadFile("../../iptables/testdata/" + mode + "-" + family + ".golden")
			if err != nil {
				t.Fatal(err)
			}
			want.Write(golden)
		}
		if string(out) != want.String() {
			t.Errorf("rules show --mode %s:\n%s\nwant:\n%s", mode, out, want.String())
		}
	}
}

// TestNodeReadyOnlyWhileDelivering: the node agent's /readyz passes only
// while traffic its rules send would reach it, and it logs interface
// patterns that match nothing.
func TestNodeReadyOnlyWhileDelivering(t *testing.T) {
	e := testutil.NewEC2(t, testutil.WithVPC())
	proxy := testutil.StartProxy(t, e.Node, binary, nodeArgs("--node-address", "10.200.2.1", "--interfaces", "cveth+,eni+",
		"--iptables-backend", "nft", "--reconcile-interval", "200ms"))
	if !strings.Contains(proxy.Logs.String(), `"unmatched":["eni+"]`) {
		t.Errorf("the pattern that matches no interface was not logged:\n%s", proxy.Logs.String())
	}
	if status, body := e.Task.Get(t, "169.254.169.254:80", "/latest/meta-data/instance-id", nil); status != 200 || body != "i-1234567890abcdef0" {
		t.Errorf("through the node agent, sent to 10.200.2.1: %d %q, want the instance id", status, body)
	}

	e.Node.Run(t, "ip", "addr", "del", "10.200.2.1/24", "dev", "uplink0")
	if _, err := proxy.Logs.WaitFor("would not reach the proxy", 5*time.Second); err != nil {
		t.Errorf("losing the node address was not logged: %v\n%s", err, proxy.Logs.String())
	}
	status, body := e.Node.Get(t, "127.0.0.1:9169", "/readyz", nil)
	if status != 503 || !strings.Contains(body, "10.200.2.1 is not an address of this host") {
		t.Errorf("/readyz after the node address went away: %d %q, want 503 naming the address", status, body)
	}
	e.Node.Run(t, "ip", "addr", "add", "10.200.2.1/24", "dev", "uplink0")
	e.Node.WaitReady(t, "127.0.0.1:9169")
	proxy.Terminate(t)
}

// TestNodeRulesRemoveNeedsNoAddress: `rules remove --mode node` works where
// no node address can be found (no route to IMDS), and leaves iptables as
// found; install there needs --node-address.
func TestNodeRulesRemoveNeedsNoAddress(t *testing.T) {
	ns := testutil.NewNetns(t)
	ns.Run(t, "ip", "link", "add", "node0", "type", "veth", "peer", "name", "node1")
	ns.Run(t, "ip", "addr", "add", "10.9.0.1/24", "dev", "node0")
	ns.Run(t, "iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
	ns.Run(t, "iptables-nft", "-t", "filter", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
	before := ns.IptablesSave(t, "iptables-nft-save")
	rules := []string{"rules", "--mode", "node", "--interfaces", "eni+", "--ipv6=false", "--iptables-backend", "nft"}
	if out, err := ns.Command(append([]string{binary, rules[0], "install"}, rules[1:]...)...).CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "--node-address") {
		t.Errorf("install without a route to IMDS or --node-address: %v %s; want an error naming --node-address", err, out)
	}
	ns.Run(t, append([]string{binary, rules[0], "install"}, append(rules[1:], "--node-address", "10.9.0.1")...)...)
	if !strings.Contains(ns.Run(t, "iptables-nft-save", "-t", "nat"), "--to-destination 10.9.0.1:8169") {
		t.Fatal("install did not DNAT to the node address")
	}
	ns.Run(t, append([]string{binary, rules[0], "remove"}, rules[1:]...)...)
	if after := ns.IptablesSave(t, "iptables-nft-save"); after != before {
		t.Errorf("after rules remove:\n%s\nwant as before:\n%s", after, before)
	}
}
