package e2e

import (
	"encoding/json"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestNodeAgentWithRealDocker runs a real Docker engine in the node
// namespace (hop limit 1, tokens required, ecs-init's wiring of the ECS
// agent's credential endpoint) and the node agent with its defaults. Real
// containers, with Docker's default capabilities, on docker0 (Docker's
// default network, ECS bridge mode) and on a user-defined network (br-*),
// run the AWS SDK for Go v2 and botocore: credentials within twice the
// node's time, no tokenless request at IMDS, the admin port unreachable,
// 169.254.170.2 still answered, and the node's ruleset (Docker's rules
// included) as before after SIGTERM.
func TestNodeAgentWithRealDocker(t *testing.T) {
	e := testutil.NewEC2(t, testutil.WiredBy(testutil.DockerEngine))
	docker := testutil.StartDocker(t, e.Node)
	testutil.StartECSAgentStandIn(t, e.Node)
	docker.BuildBotocoreImage(t, "imds-proxy-test-clients", map[string]string{"/usr/local/bin/demo-client": bins.DemoClient})
	docker.CLI(t, "network", "create", "--subnet", "172.30.0.0/24", "app")
	env := []string{"-e", "AWS_CONFIG_FILE=/dev/null", "-e", "AWS_SHARED_CREDENTIALS_FILE=/dev/null", "-e", "AWS_REGION=us-east-1", "-e", "HOME=/nonexistent"}
	containers := map[string]string{
		"docker0": docker.RunOpts(t, env, "imds-proxy-test-clients", "sleep", "3600"),
		"br-*":    docker.RunOpts(t, append([]string{"--network", "app"}, env...), "imds-proxy-test-clients", "sleep", "3600"),
	}

	onNode := medianCredentials(t, e.Node)
	botoOnNode := botocoreCredentials(t, e.Node)
	before := saveNode(t, e)
	agent := startProxyIn(t, e.Node, "node", "--upstream", "http://169.254.169.254")
	for network, id := range containers {
		goSDKIn := medianOf(t, 5, func() time.Duration {
			out, err := docker.Exec(t, id, "demo-client", "--calls", "3", "--json")
			var r sdkResult
			if err == nil {
				err = json.Unmarshal([]byte(out), &r)
			}
			if err != nil {
				t.Fatalf("Go SDK in a container on %s: %v\n%s", network, err, agent.Logs.String())
			}
			assertFast(t, "Go SDK in a container on "+network, r)
			return time.Duration(r.Credentials * float64(time.Second))
		})
		botoIn := medianOf(t, 3, func() time.Duration {
			out, err := docker.Exec(t, id, "python3", "-c", botocoreScript)
			key, seconds, err := parseBotocore([]byte(out), err)
			if err != nil || key != "12345678901" {
				t.Fatalf("botocore in a container on %s: key %q, %v", network, key, err)
			}
			return time.Duration(seconds * float64(time.Second))
		})
		if goSDKIn > withinTwice(onNode) || botoIn > withinTwice(botoOnNode) {
			t.Errorf("on %s: Go SDK %s (node %s), botocore %s (node %s): more than twice the node's", network, goSDKIn, onNode, botoIn, botoOnNode)
		}
		t.Logf("real container on %s: Go SDK %s (node %s), botocore %s (node %s)", network, goSDKIn, onNode, botoIn, botoOnNode)
		for _, addr := range e.NodeAddrs(t) {
			if out := httpGetIn(t, docker, id, "http://"+net.JoinHostPort(addr, "9169")+"/v1-callers"); !strings.HasPrefix(out, "unreachable:") {
				t.Errorf("the admin port is reachable from a container on %s at %s:9169: %q", network, addr, out)
			}
		}
		// ECS bridge-mode tasks are on docker0, where ecs-init sets route_localnet.
		if network != "docker0" {
			continue
		}
		if out := httpGetIn(t, docker, id, "http://"+testutil.ECSCredentialsAddr+testutil.ECSCredentialsPath); !strings.Contains(out, testutil.ECSStandInAccessKey) {
			t.Errorf("the ECS credential endpoint from a container on %s with the node agent: %q", network, out)
		}
	}
	if n := e.TokenlessRequests(t); n != 0 {
		t.Errorf("IMDS saw %d tokenless requests", n)
	}
	agent.Terminate(t)
	if after := saveNode(t, e); after != before {
		t.Errorf("the node's iptables after SIGTERM differ from before:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// medianOf runs measure n times and returns the median.
func medianOf(t *testing.T, n int, measure func() time.Duration) time.Duration {
	t.Helper()
	all := make([]time.Duration, 0, n)
	for range n {
		all = append(all, measure())
	}
	slices.Sort(all)
	return all[len(all)/2]
}

// httpGetIn sends one GET from inside a container with Python's urllib
// (busybox's static wget crashes on name service lookups) and returns the
// body, or "unreachable: <why>" when no HTTP answer came.
func httpGetIn(t *testing.T, docker *testutil.Docker, id, url string) string {
	t.Helper()
	const script = "import sys, urllib.request\n" +
		"try:\n" +
		"    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())\n" +
		"except urllib.error.HTTPError as e:\n" +
		"    print('HTTP', e.code)\n" +
		"except OSError as e:\n" +
		"    print('unreachable:', e)\n"
	out, err := docker.Exec(t, id, "python3", "-c", script, url)
	if err != nil {
		t.Fatalf("GET %s in a container: %v", url, err)
	}
	return strings.TrimSpace(out)
}
