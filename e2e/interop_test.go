package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// roundResult is one round of a client's credential and metadata calls,
// as every client program prints it.
type roundResult struct {
	OK          bool    `json:"ok"`
	Error       string  `json:"error"`
	AccessKeyID string  `json:"access_key_id"`
	InstanceID  string  `json:"instance_id"`
	Credentials float64 `json:"credentials_seconds"`
}

// interopClients are the IMDS client implementations beside the Go SDK v2
// and botocore: the AWS SDK for Go v1 and the AWS SDK for JavaScript v3.
func interopClients(t *testing.T) map[string][]string {
	t.Helper()
	js, err := filepath.Abs("../demo/jsclient/client.mjs")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(js), "node_modules", "@smithy", "credential-provider-imds")); err != nil {
		testutil.SkipOutsideCI(t, "the JavaScript SDK is not installed (make test runs npm ci in demo/jsclient)")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		testutil.SkipOutsideCI(t, "node is not installed (make deps installs Debian's nodejs)")
	}
	return map[string][]string{"Go SDK v1": {bins.ClientV1}, "JavaScript SDK v3": {node, js}}
}

// runClient runs one client program once in ns and returns its round.
func runClient(t *testing.T, ns *testutil.Netns, argv []string) (roundResult, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns.Name}, argv...)...)
	cmd.Env = clientEnv()
	out, err := cmd.Output()
	var r roundResult
	if jsonErr := json.Unmarshal(out, &r); jsonErr != nil {
		return r, errorsJoin(err, jsonErr, out)
	}
	return r, err
}

// TestInteropSDKs runs the AWS SDK for Go v1 and the AWS SDK for
// JavaScript v3 in the task behind each proxy mode, hop limit 1 (2 for
// the lone sidecar) and tokens required: each gets the role's credentials
// and the instance ID, and IMDS sees no tokenless request.
func TestInteropSDKs(t *testing.T) {
	clients := interopClients(t)
	modes := []struct {
		name     string
		hopLimit int
		start    func(t *testing.T, e *testutil.EC2)
	}{
		{"node agent", 1, func(t *testing.T, e *testutil.EC2) { startNodeAgent(t, e) }},
		{"sidecar", 2, func(t *testing.T, e *testutil.EC2) { startSidecar(t, e, "--upstream", "http://169.254.169.254") }},
		{"sidecar chained to the node agent", 1, func(t *testing.T, e *testutil.EC2) {
			startNodeAgent(t, e)
			startSidecar(t, e, "--upstream", "http://"+testutil.NodeAddr+":8169")
		}},
	}
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			e := testutil.NewEC2(t, testutil.HopLimit(mode.hopLimit))
			mode.start(t, e)
			for name, argv := range clients {
				r, err := runClient(t, e.Task, argv)
				if err != nil || !r.OK || r.AccessKeyID != "12345678901" || r.InstanceID != "i-1234567890abcdef0" {
					t.Errorf("%s: %+v, %v; want AEMM's credentials and instance ID", name, r, err)
					continue
				}
				t.Logf("%s: credentials in %.2fms", name, r.Credentials*1000)
			}
			if n := e.TokenlessRequests(t); n != 0 {
				t.Errorf("IMDS saw %d tokenless requests", n)
			}
		})
	}
}

func errorsJoin(runErr, jsonErr error, out []byte) error {
	if runErr != nil {
		return fmt.Errorf("%w (output %q)", runErr, out)
	}
	return fmt.Errorf("decoding %q: %w", out, jsonErr)
}
