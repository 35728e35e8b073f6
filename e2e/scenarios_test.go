package e2e

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestBaselineReproducesTheProblem: with hop limit 1 and no proxy, the SDK in
// a task pays the token timeout and falls back to IMDSv1; with tokens
// required it gets no credentials. Meanwhile a client on the node is fast.
func TestBaselineReproducesTheProblem(t *testing.T) {
	t.Run("IMDSv1 allowed", func(t *testing.T) {
		e := testutil.NewEC2(t, testutil.IMDSv1Allowed())
		fastSDK(t, "on the node", e.Node, nil)
		if n := e.TokenlessRequests(t); n != 0 {
			t.Fatalf("the SDK on the node made %d IMDSv1 requests", n)
		}
		inTask, err := goSDK(t, e.Task)
		if err != nil {
			t.Fatalf("SDK in the task: %v", err)
		}
		if d := time.Duration(inTask.Credentials * float64(time.Second)); d < noTimeoutPaid {
			t.Errorf("SDK in the task took %s: the harness did not reproduce the token timeout", d)
		}
		if n := e.TokenlessRequests(t); n == 0 {
			t.Error("IMDS saw no tokenless request: the SDK did not fall back to IMDSv1")
		}
		t.Logf("in the task without proxy: credentials %.0fms, metadata call %.0fms", inTask.Credentials*1000, inTask.PerCall*1000)
	})
	t.Run("tokens required", func(t *testing.T) {
		e := testutil.NewEC2(t)
		if _, err := goSDK(t, e.Task); err == nil {
			t.Error("the SDK in the task got credentials with hop limit 1 and tokens required")
		}
	})
}

// TestNodeModeFixesHopLimit1: the node agent makes both clients in the task
// work over IMDSv2 with tokens required, at node-local speed.
func TestNodeModeFixesHopLimit1(t *testing.T) {
	e := testutil.NewEC2(t)
	agent := startNodeAgent(t, e)
	fastSDK(t, "Go SDK, task via node agent", e.Task, agent)
	key, seconds, ok, err := botocore(t, e.Task)
	switch {
	case !ok:
		t.Log("botocore is not installed for python3 here; its part is not run")
	case err != nil:
		t.Errorf("botocore in the task through the node agent: %v", err)
	case key != "12345678901" || seconds >= noTimeoutPaid.Seconds():
		t.Errorf("botocore: key %q in %.3fs, want AEMM's key without a timeout", key, seconds)
	default:
		t.Logf("botocore, task via node agent: credentials %.2fms", seconds*1000)
	}
	if n := e.TokenlessRequests(t); n != 0 {
		t.Errorf("IMDS saw %d tokenless requests", n)
	}
}

// TestSidecarSetups: hop limit 2 direct; hop limit 1 with IMDSv1 allowed
// (fallback: only the first request may wait); hop limit 1 with tokens
// required, chained to a node agent.
func TestSidecarSetups(t *testing.T) {
	t.Run("hop limit 2", func(t *testing.T) {
		e := testutil.NewEC2(t, testutil.HopLimit(2))
		startSidecar(t, e, "--upstream", "http://169.254.169.254")
		fastSDK(t, "sidecar, hop limit 2", e.Task, nil)
		if n := e.TokenlessRequests(t); n != 0 {
			t.Errorf("IMDS saw %d tokenless requests", n)
		}
	})
	t.Run("hop limit 1, IMDSv1 allowed: fallback", func(t *testing.T) {
		e := testutil.NewEC2(t, testutil.IMDSv1Allowed())
		sidecar := startSidecar(t, e, "--upstream", "http://169.254.169.254")
		if !strings.Contains(sidecar.Logs.String(), "hop-limit symptom") {
			t.Errorf("no hop-limit diagnosis in the sidecar's log:\n%s", sidecar.Logs.String())
		}
		fastSDK(t, "sidecar in fallback, hop limit 1", e.Task, sidecar)
	})
	t.Run("hop limit 1, tokens required, chained", func(t *testing.T) {
		e := testutil.NewEC2(t)
		before := saveAll(t, e)
		agent := startNodeAgent(t, e)
		sidecar := startSidecar(t, e, "--upstream", "http://10.200.1.1:8169")
		fastSDK(t, "sidecar chained to node agent, hop limit 1", e.Task, sidecar)
		if n := e.TokenlessRequests(t); n != 0 {
			t.Errorf("IMDS saw %d tokenless requests", n)
		}
		sidecar.Terminate(t)
		agent.Terminate(t)
		if after := saveAll(t, e); after != before {
			t.Errorf("iptables after SIGTERM differ from before:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})
}

// TestV1BlockInTask: with --v1 block a tokenless GET from the task gets 401
// and is logged with its User-Agent, while the SDK keeps working over IMDSv2.
func TestV1BlockInTask(t *testing.T) {
	e := testutil.NewEC2(t, testutil.HopLimit(2), testutil.IMDSv1Allowed())
	sidecar := startSidecar(t, e, "--upstream", "http://169.254.169.254", "--v1", "block")
	status, _ := e.Task.Get(t, "169.254.169.254:80", "/latest/meta-data/iam/security-credentials/",
		http.Header{"User-Agent": {"aws-cli/1.18 Python/2.7 legacy-cron"}})
	if status != http.StatusUnauthorized {
		t.Errorf("tokenless GET with --v1 block: %d, want 401", status)
	}
	if _, err := sidecar.Logs.WaitFor("legacy-cron", 5*time.Second); err != nil {
		t.Errorf("the refused IMDSv1 call was not logged with its User-Agent: %v", err)
	}
	fastSDK(t, "SDK with --v1 block", e.Task, sidecar)
	if n := e.TokenlessRequests(t); n != 0 {
		t.Errorf("IMDS saw %d tokenless requests", n)
	}
}

// TestIPv6Endpoint: the SDK in IPv6 endpoint mode ([fd00:ec2::254]) is
// redirected to the sidecar, which serves it from its IPv4 upstream session.
func TestIPv6Endpoint(t *testing.T) {
	e := testutil.NewEC2(t, testutil.WithIPv6())
	startNodeAgent(t, e)
	sidecar := startSidecar(t, e, "--upstream", "http://10.200.1.1:8169", "--log-level", "debug")
	fastSDK(t, "SDK in IPv6 endpoint mode via sidecar", e.Task, sidecar, "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6")
	if !strings.Contains(sidecar.Logs.String(), `"caller":"fd00:200:1::2"`) {
		t.Errorf("no request reached the sidecar over IPv6:\n%s", sidecar.Logs.String())
	}
}

// saveAll is iptables-save of the node and task namespaces, both families.
// A foreign rule goes in first in each table: real namespaces have them, and
// without any iptables-nft would leave an empty table behind.
func saveAll(t *testing.T, e *testutil.EC2) string {
	t.Helper()
	var out strings.Builder
	for _, ns := range []*testutil.Netns{e.Node, e.Task} {
		for _, cmd := range []string{"iptables-nft", "ip6tables-nft"} {
			for _, table := range []string{"nat", "filter"} {
				if !strings.Contains(ns.Run(t, cmd+"-save", "-t", table), "foreign") {
					ns.Run(t, cmd, "-t", table, "-A", "OUTPUT", "-p", "udp", "-m", "comment", "--comment", "foreign", "-j", "RETURN")
				}
			}
			out.WriteString(ns.IptablesSave(t, cmd+"-save"))
		}
	}
	return out.String()
}
