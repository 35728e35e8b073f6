package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestRestartKeepsLongLivedClients: long-running applications (the AWS SDK
// for Go v2 and botocore, each keeping one IMDS client, its token and its
// keep-alive connection) in a task namespace whose only NAT rule is the
// proxy's. A proxy restart (SIGTERM, then the same command again) must go
// unnoticed: the next round succeeds, IMDS sees no tokenless request, and
// the restarted proxy lists no IMDSv1 caller.
func TestRestartKeepsLongLivedClients(t *testing.T) {
	type restartable struct {
		name string
		ns   func(*testutil.EC2) *testutil.Netns
		args []string
	}
	// Each proxy keeps its signing key in a file, as the manifests set up,
	// so the clients' tokens survive its restarts.
	sidecarKey, nodeKey := filepath.Join(t.TempDir(), "sidecar-token-key"), filepath.Join(t.TempDir(), "node-token-key")
	sidecar := func(upstream string) restartable {
		return restartable{"sidecar", func(e *testutil.EC2) *testutil.Netns { return e.Task },
			[]string{"sidecar", "--listen", "127.0.0.1:8169", "--upstream", upstream, "--v1", "block", "--token-key-file", sidecarKey}}
	}
	node := restartable{"node agent", func(e *testutil.EC2) *testutil.Netns { return e.Node },
		[]string{"node", "--listen", ":8169", "--interfaces", testutil.RoutedVeth.Interfaces,
			"--upstream", "http://169.254.169.254", "--v1", "block", "--token-key-file", nodeKey}}
	for _, mode := range []struct {
		name     string
		hopLimit int
		proxies  []restartable // started in this order; each is restarted in turn
	}{
		{"sidecar", 2, []restartable{sidecar("http://169.254.169.254")}},
		{"node agent", 1, []restartable{node}},
		{"chained", 1, []restartable{node, sidecar("http://10.200.1.1:8169")}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			e := testutil.NewEC2(t, testutil.HopLimit(mode.hopLimit))
			running := make([]*testutil.Process, len(mode.proxies))
			for i, p := range mode.proxies {
				running[i] = startProxyIn(t, p.ns(e), p.args...)
			}
			clients := startLongLivedClients(t, e.Task)
			logs := func() string {
				var b strings.Builder
				for i, p := range running {
					fmt.Fprintf(&b, "--- %s:\n%s", mode.proxies[i].name, p.Logs.String())
				}
				return b.String()
			}
			for _, c := range clients {
				if r := c.round(t); !r.good() {
					t.Fatalf("%s before any restart: %+v\n%s", c.name, r, logs())
				}
			}
			// Each proxy is restarted, then replaced by the next version of
			// itself, as a rollout does.
			for step := 0; step < 2*len(mode.proxies); step++ {
				i, p := step%len(mode.proxies), mode.proxies[step%len(mode.proxies)]
				binary, how := bins.Proxy, "restarted"
				if step >= len(mode.proxies) {
					binary, how = bins.ProxyNext, "replaced by its next version"
				}
				running[i].Terminate(t)
				if i == len(running)-1 { // the proxy the clients' IMDS connections reach
					if open := openIMDSConnections(t, e.Task); open != "" {
						t.Errorf("after the %s's SIGTERM the clients' keep-alive connections were not closed:\n%s", p.name, open)
					}
				}
				// A restart takes a while (a container's restart, a
				// rollout): longer than the first retransmissions of a
				// close that went untranslated.
				time.Sleep(restartDowntime)
				running[i] = startBinaryIn(t, p.ns(e), binary, p.args...)
				for _, c := range clients {
					start := time.Now()
					if r := c.round(t); !r.good() {
						t.Errorf("%s after the %s was %s: %+v", c.name, p.name, how, r)
					}
					t.Logf("%s: first round after the %s was %s took %s", c.name, p.name, how, time.Since(start).Round(time.Millisecond))
				}
				if n := e.TokenlessRequests(t); n != 0 {
					t.Errorf("after the %s restarted, IMDS saw %d tokenless requests", p.name, n)
				}
				if status, body := p.ns(e).Get(t, "127.0.0.1:9169", "/v1-callers", nil); status != 200 || strings.TrimSpace(body) != "[]" {
					t.Errorf("the restarted %s lists IMDSv1 callers: %d %s", p.name, status, body)
				}
			}
			if t.Failed() {
				t.Logf("proxy logs:\n%s", logs())
			}
		})
	}
}

// openIMDSConnections lists the established TCP connections to IMDS in
// ns, waiting up to a second for them to close; a socket that received
// the proxy's close is in CLOSE-WAIT (or gone), not established.
func openIMDSConnections(t *testing.T, ns *testutil.Netns) string {
	t.Helper()
	var open string
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if open = strings.TrimSpace(ns.Run(t, "ss", "-Htn", "state", "established", "dst", "169.254.169.254")); open == "" {
			break
		}
	}
	return open
}

// restartDowntime is how long a restarted proxy is away.
const restartDowntime = 2 * time.Second

func (r roundResult) good() bool {
	return r.OK && r.Error == "" && r.AccessKeyID == "12345678901" && r.InstanceID == "i-1234567890abcdef0"
}

// longLivedClient is a client process that does one round per line on its
// stdin and answers with one JSON line.
type longLivedClient struct {
	name  string
	in    io.WriteCloser
	out   *bufio.Scanner
	lines chan string
}

// startLongLivedClients starts the Go SDK's and botocore's long-lived
// clients in ns (botocore only where python3 has it, and always in CI).
func startLongLivedClients(t *testing.T, ns *testutil.Netns) []*longLivedClient {
	t.Helper()
	goClient := ns.Command(bins.DemoClient, "--long-lived")
	goClient.Env = clientEnv()
	clients := []*longLivedClient{startLongLived(t, "Go SDK v2", goClient)}
	if exec.Command("python3", "-c", "import botocore").Run() != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("botocore is not installed for python3, and CI must run it")
		}
		t.Log("botocore is not installed for python3 here; its client is not run")
		return clients
	}
	py := ns.Command("python3", "-c", botocoreLongLivedScript)
	py.Env = append(clientEnv(), "HOME="+os.Getenv("HOME"))
	clients = append(clients, startLongLived(t, "botocore", py))
	for name, argv := range interopClients(t) {
		cmd := ns.Command(append(argv, "--long-lived")...)
		cmd.Env = clientEnv()
		clients = append(clients, startLongLived(t, name, cmd))
	}
	return clients
}

func startLongLived(t *testing.T, name string, cmd *exec.Cmd) *longLivedClient {
	t.Helper()
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &longLivedClient{name: name, in: in, out: bufio.NewScanner(out), lines: make(chan string)}
	go func() {
		defer close(c.lines)
		for c.out.Scan() {
			c.lines <- c.out.Text()
		}
	}()
	t.Cleanup(func() {
		in.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() && stderr.Len() > 0 {
			t.Logf("%s stderr:\n%s", name, stderr.String())
		}
	})
	return c
}

// round asks for one round and returns its result.
func (c *longLivedClient) round(t *testing.T) roundResult {
	t.Helper()
	if _, err := io.WriteString(c.in, "\n"); err != nil {
		t.Fatalf("%s: %v", c.name, err)
	}
	select {
	case line, ok := <-c.lines:
		if !ok {
			t.Fatalf("%s exited", c.name)
		}
		var r roundResult
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("%s: decoding %q: %v", c.name, line, err)
		}
		return r
	case <-time.After(60 * time.Second):
		t.Fatalf("%s: no answer within a minute", c.name)
	}
	return roundResult{}
}

// botocoreLongLivedScript is a long-running boto3 application: one botocore
// session and one InstanceMetadataFetcher (so one urllib3 pool, whose
// keep-alive connections it reuses) configured as botocore's credential
// chain configures it. For every line on stdin it GETs instance-id and
// fetches the role's credentials (no cache: the fetcher asks IMDS each
// time), and prints one JSON line. botocore's debug log of the round goes
// into "error" when the round fails.
const botocoreLongLivedScript = `
import io, json, logging, sys
import botocore.session
from botocore.utils import InstanceMetadataFetcher
s = botocore.session.get_session()
log = io.StringIO()
h = logging.StreamHandler(log)
h.setFormatter(logging.Formatter('%(levelname)s %(message)s'))
logging.getLogger('botocore.utils').addHandler(h)
logging.getLogger('botocore.utils').setLevel(logging.DEBUG)
f = InstanceMetadataFetcher(
    timeout=s.get_config_variable('metadata_service_timeout'),
    num_attempts=s.get_config_variable('metadata_service_num_attempts'),
    user_agent=s.user_agent())
for _ in sys.stdin:
    log.seek(0); log.truncate()
    r = {'ok': False, 'error': '', 'access_key_id': '', 'instance_id': ''}
    try:
        token = f._fetch_metadata_token()
        resp = f._get_request('/latest/meta-data/instance-id', None, token)
        r['instance_id'] = resp.text
        c = f.retrieve_iam_role_credentials()
        r['access_key_id'] = c.get('access_key', '')
        r['ok'] = bool(r['access_key_id'])
    except Exception as e:
        r['error'] = repr(e)
    if not r['ok']:
        r['error'] = (r['error'] + ' ' + ' | '.join(log.getvalue().splitlines())[:2000]).strip()
    print(json.dumps(r), flush=True)
`
