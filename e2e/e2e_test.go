// Package e2e reproduces the IMDSv2 hop-limit problem with real AWS clients
// in network namespaces, and shows imds-proxy fixing it in each mode.
package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

var bins *testutil.Binaries

func TestMain(m *testing.M) {
	var err error
	if bins, err = testutil.BuildBinaries(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	bins.Remove()
	os.Exit(code)
}

// sdkResult is what the demo client (the AWS SDK for Go v2) reports.
type sdkResult struct {
	Credentials float64 `json:"credentials_seconds"`
	PerCall     float64 `json:"per_call_seconds"`
	AccessKeyID string  `json:"access_key_id"`
	InstanceID  string  `json:"instance_id"`
}

// clientEnv leaves the SDKs nothing but the instance role to find.
func clientEnv() []string {
	return []string{"PATH=" + os.Getenv("PATH"), "HOME=/nonexistent",
		"AWS_CONFIG_FILE=/dev/null", "AWS_SHARED_CREDENTIALS_FILE=/dev/null", "AWS_REGION=us-east-1"}
}

// goSDK runs the Go SDK in ns against the IMDS address, as an application
// does, and returns its timings or its failure.
func goSDK(t *testing.T, ns *testutil.Netns, env ...string) (sdkResult, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// No endpoint: the SDK's default, 169.254.169.254 (or [fd00:ec2::254] in IPv6 mode).
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns.Name, bins.DemoClient, "--calls", "3", "--json")
	cmd.Env = append(clientEnv(), env...)
	out, err := cmd.Output()
	if err != nil {
		return sdkResult{}, fmt.Errorf("%w: %s", err, out)
	}
	var r sdkResult
	if err := json.Unmarshal(out, &r); err != nil {
		return sdkResult{}, fmt.Errorf("decoding %q: %w", out, err)
	}
	return r, nil
}

// botocore fetches credentials with botocore (AWS CLI v1, boto3) in ns, when
// this machine's python3 has it; ok is false when it does not.
func botocore(t *testing.T, ns *testutil.Netns) (accessKey string, seconds float64, ok bool, err error) {
	t.Helper()
	if exec.Command("python3", "-c", "import botocore").Run() != nil {
		return "", 0, false, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns.Name, "python3", "-c", botocoreScript)
	cmd.Env = append(clientEnv(), "HOME="+os.Getenv("HOME")) // pyenv finds its Python through HOME
	out, err := cmd.CombinedOutput()
	accessKey, seconds, err = parseBotocore(out, err)
	return accessKey, seconds, true, err
}

// botocoreScript fetches credentials the way boto3 and the AWS CLI v1 do,
// and prints the access key and the seconds it took.
const botocoreScript = "import time, botocore.session\n" +
	"s = time.monotonic()\n" +
	"c = botocore.session.get_session().get_credentials()\n" +
	"print(c.access_key if c else 'NONE', time.monotonic() - s)\n"

func parseBotocore(out []byte, err error) (accessKey string, seconds float64, _ error) {
	if err != nil {
		return "", 0, fmt.Errorf("%w: %s", err, out)
	}
	if _, err := fmt.Sscan(string(out), &accessKey, &seconds); err != nil {
		return "", 0, fmt.Errorf("parsing %q: %w", out, err)
	}
	return accessKey, seconds, nil
}

// startNodeAgent runs `imds-proxy node` in the node namespace.
func startNodeAgent(t *testing.T, e *testutil.EC2, args ...string) *testutil.Process {
	t.Helper()
	return startProxyIn(t, e.Node, append([]string{"node", "--listen", ":8169", "--interfaces", e.Wiring.Interfaces,
		"--upstream", "http://169.254.169.254"}, args...)...)
}

// startSidecar runs `imds-proxy sidecar` in the task namespace.
func startSidecar(t *testing.T, e *testutil.EC2, args ...string) *testutil.Process {
	t.Helper()
	return startProxyIn(t, e.Task, append([]string{"sidecar", "--listen", "127.0.0.1:8169"}, args...)...)
}

// startProxyIn runs an imds-proxy serving command in ns, with its admin
// endpoints on 127.0.0.1:9169 there (a node agent's default), and waits
// until it is ready.
func startProxyIn(t *testing.T, ns *testutil.Netns, args ...string) *testutil.Process {
	t.Helper()
	return startBinaryIn(t, ns, bins.Proxy, args...)
}

// startBinaryIn is startProxyIn with another imds-proxy binary.
func startBinaryIn(t *testing.T, ns *testutil.Netns, binary string, args ...string) *testutil.Process {
	t.Helper()
	argv := append(slices.Clone(args), "--iptables-backend", "nft")
	if args[0] == "sidecar" {
		argv = append(argv, "--metrics-listen", "127.0.0.1:9169")
	}
	return testutil.StartProxy(t, ns, binary, argv)
}

// noTimeoutPaid is a coarse bound, far above a normal fetch (milliseconds)
// and below the SDK's IMDSv2 timeout-and-fallback (a second or more).
const noTimeoutPaid = time.Second

// fastSDK runs the Go SDK in ns, as goSDK does, and asserts that it got
// AEMM's credentials without paying a token timeout; what names the setup,
// and proxy, when not nil, is the proxy whose log a failure shows.
func fastSDK(t *testing.T, what string, ns *testutil.Netns, proxy *testutil.Process, env ...string) sdkResult {
	t.Helper()
	r, err := goSDK(t, ns, env...)
	if err != nil {
		var logs string
		if proxy != nil {
			logs = proxy.Logs.String()
		}
		t.Fatalf("%s: %v\n%s", what, err, logs)
	}
	assertFast(t, what, r)
	return r
}

func assertFast(t *testing.T, what string, r sdkResult) {
	t.Helper()
	if r.AccessKeyID != "12345678901" || r.InstanceID != "i-1234567890abcdef0" {
		t.Errorf("%s: got key %q instance %q, not AEMM's", what, r.AccessKeyID, r.InstanceID)
	}
	if d := time.Duration(r.Credentials * float64(time.Second)); d >= noTimeoutPaid {
		t.Errorf("%s: credentials took %s: a token timeout was paid", what, d)
	}
	t.Logf("%s: credentials %.2fms, metadata call %.2fms", what, r.Credentials*1000, r.PerCall*1000)
}
