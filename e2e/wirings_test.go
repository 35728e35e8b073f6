package e2e

import (
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestNodeAgentOnEveryWiring runs the node agent, with its defaults, on each
// way real nodes wire containers, with hop limit 1 and tokens required, and
// the AWS SDK for Go v2 and botocore in the container. On each, the
// container gets credentials about as fast as the same client on the node,
// IMDS sees no tokenless request, the agent's admin port is unreachable
// from the container, and SIGTERM leaves the node's ruleset as it was.
func TestNodeAgentOnEveryWiring(t *testing.T) {
	for _, w := range []testutil.Wiring{testutil.DockerBridge, testutil.VPCCNI, testutil.Calico, testutil.Cilium} {
		t.Run(w.Name, func(t *testing.T) {
			e := testutil.NewEC2(t, testutil.WiredBy(w))
			checkNodeAgent(t, e)
		})
	}
}

// TestNodeAgentOnECSBridge is ECS bridge mode: containers on docker0, and
// the ECS agent's task credential endpoint 169.254.170.2 wired by ecs-init
// (a DNAT to the agent on 127.0.0.1:51679 with route_localnet on docker0).
// The node agent must leave that endpoint working.
func TestNodeAgentOnECSBridge(t *testing.T) {
	e := testutil.NewEC2(t, testutil.WiredBy(testutil.DockerBridge))
	testutil.StartECSAgentStandIn(t, e.Node)
	credentials := func(when string) {
		t.Helper()
		status, body := e.Task.Get(t, testutil.ECSCredentialsAddr, testutil.ECSCredentialsPath, nil)
		if status != http.StatusOK || !strings.Contains(body, testutil.ECSStandInAccessKey) {
			t.Errorf("%s: task credentials from 169.254.170.2: %d %q, want the ECS agent stand-in's", when, status, body)
		}
	}
	credentials("before the node agent")
	checkNodeAgent(t, e, func() { credentials("with the node agent") })
	credentials("after the node agent")
}

// checkNodeAgent measures the clients on the node, starts the node agent
// with its defaults for e's wiring, and asserts what every wiring must
// give; during runs more checks while the agent serves.
func checkNodeAgent(t *testing.T, e *testutil.EC2, during ...func()) {
	t.Helper()
	onNode := medianCredentials(t, e.Node)
	botoOnNode := botocoreCredentials(t, e.Node)
	before := saveNode(t, e)

	agent := startProxyIn(t, e.Node, "node", "--interfaces", e.Wiring.Interfaces, "--upstream", "http://169.254.169.254")
	inTask := medianCredentials(t, e.Task)
	if limit := withinTwice(onNode); inTask > limit {
		t.Errorf("Go SDK credentials in the container took %s, more than %s (twice the %s on the node)", inTask, limit, onNode)
	}
	botoInTask := botocoreCredentials(t, e.Task)
	if botoInTask > withinTwice(botoOnNode) {
		t.Errorf("botocore credentials in the container took %s, more than twice the %s on the node", botoInTask, botoOnNode)
	}
	t.Logf("credentials (medians): Go SDK %s on the node, %s in the container; botocore %s on the node, %s in the container",
		onNode.Round(10*time.Microsecond), inTask.Round(10*time.Microsecond), botoOnNode.Round(10*time.Microsecond), botoInTask.Round(10*time.Microsecond))
	if n := e.TokenlessRequests(t); n != 0 {
		t.Errorf("IMDS saw %d tokenless requests", n)
	}
	for _, addr := range e.NodeAddrs(t) {
		if err := e.Task.TryDial(t, net.JoinHostPort(addr, "9169")); err == nil {
			t.Errorf("the node agent's admin port is reachable from the container at %s:9169", addr)
		}
	}
	for _, check := range during {
		check()
	}
	if t.Failed() {
		t.Logf("node agent log:\n%s", agent.Logs.String())
	}
	agent.Terminate(t)
	if after := saveNode(t, e); after != before {
		t.Errorf("the node's iptables after SIGTERM differ from before:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// withinTwice is twice d, plus 10ms for the scheduling noise of a loaded
// two-core machine: a paid token timeout costs a second or more.
func withinTwice(d time.Duration) time.Duration { return 2*d + 10*time.Millisecond }

// medianCredentials is the median of five Go SDK credential fetches in ns,
// each a fresh process, as applications start.
func medianCredentials(t *testing.T, ns *testutil.Netns) time.Duration {
	t.Helper()
	var all []time.Duration
	for range 5 {
		r := fastSDK(t, "Go SDK in "+ns.Name, ns, nil)
		all = append(all, time.Duration(r.Credentials*float64(time.Second)))
	}
	slices.Sort(all)
	return all[len(all)/2]
}

// botocoreCredentials is the median of three botocore credential fetches
// in ns, each a fresh process; CI must have botocore.
func botocoreCredentials(t *testing.T, ns *testutil.Netns) time.Duration {
	t.Helper()
	var all []time.Duration
	for range 3 {
		key, seconds, ok, err := botocore(t, ns)
		switch {
		case !ok:
			testutil.SkipOutsideCI(t, "botocore is not installed for python3 here")
		case err != nil:
			t.Fatalf("botocore in %s: %v", ns, err)
		case key != "12345678901":
			t.Fatalf("botocore in %s got key %q, not AEMM's", ns, key)
		}
		all = append(all, time.Duration(seconds*float64(time.Second)))
	}
	slices.Sort(all)
	return all[len(all)/2]
}

// saveNode is iptables-save of the node namespace, both families, after a
// foreign rule is added to each table (real nodes have them).
func saveNode(t *testing.T, e *testutil.EC2) string {
	t.Helper()
	var out strings.Builder
	for _, cmd := range []string{"iptables-nft", "ip6tables-nft"} {
		for _, table := range []string{"nat", "filter"} {
			if !strings.Contains(e.Node.Run(t, cmd+"-save", "-t", table), "foreign") {
				e.Node.Run(t, cmd, "-t", table, "-A", "OUTPUT", "-p", "udp", "-m", "comment", "--comment", "foreign", "-j", "RETURN")
			}
		}
		out.WriteString(e.Node.IptablesSave(t, cmd+"-save"))
	}
	return out.String()
}

// TestNodeAgentIPv6OnVPCCNI: an IPv6 pod of the VPC CNI (gateway fe80::1, a
// static neighbour entry to the address-less host veth, a /128 route) uses
// the IPv6 endpoint [fd00:ec2::254]. The node agent's IPv6 rule keeps
// REDIRECT, which sends to the host veth's link-local address: usable once
// its duplicate address detection is over (until then the kernel drops
// packets to it, and the SDK pays its timeout), which AddVPCCNIIPv6 waits
// for.
func TestNodeAgentIPv6OnVPCCNI(t *testing.T) {
	e := testutil.NewEC2(t, testutil.WiredBy(testutil.VPCCNI))
	testutil.AddVPCCNIIPv6(t, e, "fd00:5::17")
	agent := startNodeAgent(t, e, "--log-level", "debug")
	fastSDK(t, "Go SDK, IPv6 VPC CNI pod via node agent", e.Task, agent, "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6")
	if !strings.Contains(agent.Logs.String(), `"caller":"fd00:5::17"`) {
		t.Errorf("no request reached the node agent over IPv6:\n%s", agent.Logs.String())
	}
}
