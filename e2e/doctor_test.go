package e2e

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/doctor"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// runDoctor runs `imds-proxy doctor --json` in ns and returns its report and
// exit status.
func runDoctor(t *testing.T, ns *testutil.Netns) (doctor.Report, int) {
	t.Helper()
	start := time.Now()
	cmd := exec.Command("ip", "netns", "exec", ns.Name, bins.Proxy, "doctor", "--json")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	out, err := cmd.Output()
	elapsed := time.Since(start)
	code := 0
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		code = exit.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	var r doctor.Report
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("doctor --json printed %q: %v", out, err)
	}
	// The bound the doctor promises; its own timeouts add up to 4.5 s.
	if elapsed >= 5*time.Second {
		t.Errorf("doctor took %s", elapsed)
	}
	return r, code
}

func TestDoctorDiagnoses(t *testing.T) {
	t.Run("hop limit 1 from a task, tokens required", func(t *testing.T) {
		e := testutil.NewEC2(t)
		r, code := runDoctor(t, e.Task)
		if code != doctor.ExitHopLimit || !strings.Contains(r.Diagnosis, "hop-limit") || !r.TokensRequired {
			t.Errorf("exit %d, report %+v; want the hop-limit diagnosis with tokens required", code, r)
		}
		if len(r.Fixes) == 0 || !strings.Contains(r.Fixes[0], "--http-put-response-hop-limit 2") {
			t.Errorf("fixes %q do not name the hop-limit command", r.Fixes)
		}
	})
	t.Run("healthy from the node", func(t *testing.T) {
		e := testutil.NewEC2(t)
		r, code := runDoctor(t, e.Node)
		if code != doctor.ExitHealthy || !r.TokensRequired || r.Proxy != "" || r.Rules != "absent" {
			t.Errorf("exit %d, report %+v; want healthy, tokens required, no proxy, no rules", code, r)
		}
	})
	t.Run("IMDSv1 allowed, hop limit 1 from a task", func(t *testing.T) {
		e := testutil.NewEC2(t, testutil.IMDSv1Allowed())
		r, code := runDoctor(t, e.Task)
		if code != doctor.ExitHopLimit || r.TokensRequired || r.V1Get.Status != 200 {
			t.Errorf("exit %d, report %+v; want the hop-limit diagnosis with IMDSv1 answering", code, r)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		r, code := runDoctor(t, testutil.NewNetns(t))
		if code != doctor.ExitUnreachable || r.Connects {
			t.Errorf("exit %d, report %+v; want unreachable", code, r)
		}
	})
	t.Run("behind the node agent", func(t *testing.T) {
		e := testutil.NewEC2(t)
		startNodeAgent(t, e)
		r, code := runDoctor(t, e.Task)
		if code != doctor.ExitHealthy || r.Proxy != "node" {
			t.Errorf("exit %d, report %+v; want healthy through the node agent", code, r)
		}
	})
	t.Run("behind a sidecar", func(t *testing.T) {
		e := testutil.NewEC2(t, testutil.HopLimit(2))
		startSidecar(t, e, "--upstream", "http://169.254.169.254")
		r, code := runDoctor(t, e.Task)
		// This sidecar runs in the test's own (root) cgroup: it falls back to the mark, and doctor says so.
		if code != doctor.ExitHealthy || r.Proxy != "sidecar" || !strings.HasPrefix(r.Rules, "present, exempting the proxy by mark") {
			t.Errorf("exit %d, report %+v; want healthy through the sidecar with its rules present", code, r)
		}
	})
	t.Run("behind a sidecar denying the metadata path", func(t *testing.T) {
		// The token works; the metadata GET with it is refused by the path policy.
		e := testutil.NewEC2(t, testutil.HopLimit(2))
		startSidecar(t, e, "--upstream", "http://169.254.169.254", "--deny-path", "/latest/meta-data/")
		r, code := runDoctor(t, e.Task)
		if code != doctor.ExitV2Refused || r.Token.Status != 200 || r.V2Get == nil || r.V2Get.Status != 403 ||
			strings.Contains(r.Diagnosis, "refuses IMDSv2 tokens") || !strings.Contains(r.Diagnosis, "HTTP 403 to GET /latest/meta-data/") {
			t.Errorf("exit %d, report %+v; want the metadata GET's 403 diagnosed, not a refused token", code, r)
		}
	})
	t.Run("VPC CNI pod behind an address-less REDIRECT", func(t *testing.T) {
		// The rule an imds-proxy before DNAT delivery installed, in its chain.
		e := testutil.NewEC2(t, testutil.WiredBy(testutil.VPCCNI))
		e.Node.Run(t, "iptables-nft", "-t", "nat", "-N", "IMDS_PROXY_PREROUTING")
		e.Node.Run(t, "iptables-nft", "-t", "nat", "-A", "IMDS_PROXY_PREROUTING", "-i", "eni+", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "8169")
		e.Node.Run(t, "iptables-nft", "-t", "nat", "-A", "PREROUTING", "-d", "169.254.169.254/32", "-p", "tcp", "--dport", "80", "-j", "IMDS_PROXY_PREROUTING")
		r, code := runDoctor(t, e.Task)
		if code != doctor.ExitUnreachable || r.ConnectError != "timed out" || strings.Contains(r.Diagnosis, "hop-limit") ||
			!strings.Contains(r.Diagnosis, "REDIRECT onto a host interface without an IPv4 address") {
			t.Errorf("in the pod: exit %d, report %+v; want unreachable, timed out, naming the redirect", code, r)
		}
		r, code = runDoctor(t, e.Node)
		if code != doctor.ExitNodeAgent || !strings.Contains(r.Diagnosis, "REDIRECT drops IMDS traffic arriving on eni3f2a9c1d8e7") {
			t.Errorf("on the node: exit %d, report %+v; want the node agent's REDIRECT on eni3f2a9c1d8e7 named", code, r)
		}
	})
	t.Run("node agent whose interfaces match nothing", func(t *testing.T) {
		e := testutil.NewEC2(t, testutil.WiredBy(testutil.VPCCNI))
		startProxyIn(t, e.Node, "node", "--interfaces", "cali+", "--upstream", "http://169.254.169.254")
		r, code := runDoctor(t, e.Node)
		if code != doctor.ExitNodeAgent || r.Node == nil || !slices.Contains(r.Node.Unmatched, "eni3f2a9c1d8e7") ||
			!strings.Contains(r.Diagnosis, "no --interfaces pattern (cali+) matches") {
			t.Errorf("on the node: exit %d, report %+v; want the unmatched eni interface named", code, r)
		}
	})
}
