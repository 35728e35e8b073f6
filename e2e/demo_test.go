package e2e

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// demoRow is one setup of the demo table.
type demoRow struct {
	name           string
	hopLimit       int
	tokensRequired bool
	// wiring connects the task to the node.
	wiring testutil.Wiring
	// start starts the setup's proxies and returns the namespace the client runs in.
	start func(t *testing.T, e *testutil.EC2) *testutil.Netns
	// slow: the row shows the problem, not the fix.
	slow bool
}

func onNode(_ *testing.T, e *testutil.EC2) *testutil.Netns { return e.Node }

func inTask(_ *testing.T, e *testutil.EC2) *testutil.Netns { return e.Task }

func viaNodeAgent(t *testing.T, e *testutil.EC2) *testutil.Netns {
	startNodeAgent(t, e)
	return e.Task
}

var demoRows = []demoRow{
	{"on the node, no proxy", 1, true, testutil.RoutedVeth, onNode, false},
	{"task, no proxy, IMDSv1 allowed", 1, false, testutil.RoutedVeth, inTask, true},
	{"task, no proxy, tokens required", 1, true, testutil.RoutedVeth, inTask, true},
	{"task via node agent", 1, true, testutil.RoutedVeth, viaNodeAgent, false},
	{"Docker bridge via node agent", 1, true, testutil.DockerBridge, viaNodeAgent, false},
	{"VPC CNI pod via node agent", 1, true, testutil.VPCCNI, viaNodeAgent, false},
	{"Calico pod via node agent", 1, true, testutil.Calico, viaNodeAgent, false},
	{"Cilium pod via node agent", 1, true, testutil.Cilium, viaNodeAgent, false},
	{"task via sidecar (hop limit 2)", 2, true, testutil.RoutedVeth, func(t *testing.T, e *testutil.EC2) *testutil.Netns {
		startSidecar(t, e, "--upstream", "http://169.254.169.254")
		return e.Task
	}, false},
	{"task via sidecar -> node agent", 1, true, testutil.RoutedVeth, func(t *testing.T, e *testutil.EC2) *testutil.Netns {
		startNodeAgent(t, e)
		startSidecar(t, e, "--upstream", "http://"+testutil.NodeAddr+":8169")
		return e.Task
	}, false},
}

// TestDemoTable is what `make demo` shows (and `make bench` with more runs,
// IMDS_PROXY_BENCH_RUNS): the AWS SDK for Go v2 fetching role credentials
// and metadata in each setup, hop limit 1 unless noted. It prints the table
// to stdout; it asserts only that fixed setups pay no token timeout.
func TestDemoTable(t *testing.T) {
	runs := 1
	if n, err := strconv.Atoi(os.Getenv("IMDS_PROXY_BENCH_RUNS")); err == nil && n > 0 && n <= 50 {
		runs = n
	}
	fmt.Printf("\nAWS SDK for Go v2 in network namespaces: task -> node (forwards) -> IMDS mock (AEMM),\n"+
		"token responses sent with IP TTL = hop limit. Median of %d run(s).\n\n", runs)
	fmt.Printf("%-36s %14s %16s %12s %9s\n", "setup", "credentials", "metadata call", "vs node", "v1 @IMDS")
	var onNode time.Duration
	for _, row := range demoRows {
		setup := []testutil.EC2Option{testutil.WiredBy(row.wiring), testutil.HopLimit(row.hopLimit)}
		if !row.tokensRequired {
			setup = append(setup, testutil.IMDSv1Allowed())
		}
		e := testutil.NewEC2(t, setup...)
		ns := row.start(t, e)
		cred, call, err := medianSDK(t, ns, runs)
		if err != nil {
			fmt.Printf("%-36s %14s %16s %12s %9d\n", row.name, "no credentials", "-", "-", e.TokenlessRequests(t))
			if !row.slow {
				t.Errorf("%s: %v", row.name, err)
			}
			continue
		}
		if onNode == 0 {
			onNode = cred
		}
		fmt.Printf("%-36s %14s %16s %11.1fx %9d\n", row.name, round(cred), round(call),
			float64(cred)/float64(onNode), e.TokenlessRequests(t))
		if !row.slow && cred >= noTimeoutPaid {
			t.Errorf("%s: credentials took %s", row.name, cred)
		}
	}
	fmt.Println()
}

// medianSDK runs the Go SDK runs times in ns and returns the median
// credential fetch and metadata call times.
func medianSDK(t *testing.T, ns *testutil.Netns, runs int) (cred, call time.Duration, err error) {
	var creds, calls []time.Duration
	for i := 0; i < runs; i++ {
		r, err := goSDK(t, ns)
		if err != nil {
			return 0, 0, err
		}
		creds = append(creds, time.Duration(r.Credentials*float64(time.Second)))
		calls = append(calls, time.Duration(r.PerCall*float64(time.Second)))
	}
	slices.Sort(creds)
	slices.Sort(calls)
	return creds[len(creds)/2], calls[len(calls)/2], nil
}

func round(d time.Duration) string {
	if d >= time.Second {
		return d.Round(10 * time.Millisecond).String()
	}
	return d.Round(10 * time.Microsecond).String()
}
