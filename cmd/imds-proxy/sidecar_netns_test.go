package main

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/inject"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// newSidecarEC2 is an instance whose task's sidecar reaches IMDS (tokens
// required) directly, hop limit 2, and whose task reaches [fd00:ec2::254]
// too: the IPv6 endpoint its rules must redirect.
func newSidecarEC2(t *testing.T) *testutil.EC2 {
	t.Helper()
	return testutil.NewEC2(t, testutil.HopLimit(2), testutil.WithIPv6())
}

// saveRules is iptables-save of ns, both families.
func saveRules(t *testing.T, ns *testutil.Netns) string {
	t.Helper()
	return ns.IptablesSave(t, "iptables-nft-save") + ns.IptablesSave(t, "ip6tables-nft-save")
}

// TestSidecarRedirectsAndCleansUp runs `imds-proxy sidecar` with its rules in
// a task namespace: a client dialling 169.254.169.254:80 reaches the proxy,
// the proxy's own upstream connections reach IMDS (not itself), a deleted
// rule comes back, and SIGTERM leaves iptables exactly as it found them.
func TestSidecarRedirectsAndCleansUp(t *testing.T) {
	e := newSidecarEC2(t)
	const imds = "169.254.169.254:80"
	// Without the proxy, IMDSv1 is refused: AEMM requires tokens.
	if status, _ := e.Task.Get(t, imds, "/latest/meta-data/instance-id", nil); status != 401 {
		t.Fatalf("control: tokenless GET straight to IMDS got %d, want 401", status)
	}
	// Someone else's nat rules (another sidecar's redirect), which must
	// survive untouched. A NAT rule also turns on connection tracking, so the
	// early connection below is tracked as not redirected. (Without any
	// rules, iptables-nft would leave an empty nat table behind.)
	addForeignNATRules(t, e.Task)
	before := saveRules(t, e.Task)
	// A keep-alive connection opened before the redirect exists.
	early := dialIn(t, e.Task, imds)
	if status := getOn(t, early, "/latest/meta-data/instance-id"); status != 401 {
		t.Fatalf("control: tokenless GET on the early connection got %d, want 401 from IMDS", status)
	}

	proxy := testutil.StartProxy(t, e.Task, binary, sidecarArgs("--reconcile-interval", "200ms", "--iptables-backend", "nft", "--log-level", "debug"))
	installed := saveRules(t, e.Task)
	if !strings.Contains(installed, "IMDS_PROXY_OUTPUT") {
		t.Fatalf("no rules after start:\n%s", installed)
	}

	// A tokenless GET now reaches the proxy, which serves it over its own
	// IMDSv2 session: only a redirect to the proxy can turn 401 into 200.
	if status, body := e.Task.Get(t, imds, "/latest/meta-data/instance-id", nil); status != 200 || body != "i-1234567890abcdef0" {
		t.Errorf("tokenless GET through the redirect: %d %q, want 200 and the instance id", status, body)
	}
	// The IPv6 endpoint is redirected too (to the proxy's [::1] listener).
	if status, body := e.Task.Get(t, "[fd00:ec2::254]:80", "/latest/meta-data/instance-id", nil); status != 200 || body != "i-1234567890abcdef0" {
		t.Errorf("tokenless GET to [fd00:ec2::254] through the redirect: %d %q, want 200 and the instance id", status, body)
	}
	runSDK(t, e.Task, "http://169.254.169.254")
	// The early connection must not keep reaching IMDS past the proxy.
	if status := getOn(t, early, "/latest/meta-data/instance-id"); status == 401 {
		t.Error("a connection opened before the rules still reaches IMDS directly")
	}
	if n := testutil.CountLines(e.AEMM.Logs(), "No token provided"); n != 3 { // both controls above, and the proxy's IMDSv1 probe
		t.Errorf("AEMM refused %d tokenless requests, want 3 (the two controls before the proxy started, and its probe)", n)
	}
	if n := testutil.CountLines(e.AEMM.Logs(), "GenerateToken Received request"); n != 1 {
		t.Errorf("AEMM issued %d tokens, want exactly 1: the proxy's own (client PUTs must stay in the proxy)", n)
	}

	e.Task.Run(t, "iptables-nft", "-t", "nat", "-F", "IMDS_PROXY_OUTPUT")
	if _, err := proxy.Logs.WaitFor("iptables rule missing; restoring it", 10*time.Second); err != nil {
		t.Errorf("a flushed chain was not noticed: %v", err)
	}
	waitFor(t, 10*time.Second, func() bool { return saveRules(t, e.Task) == installed }, "the flushed rules to come back")

	proxy.Terminate(t)
	if after := saveRules(t, e.Task); after != before {
		t.Errorf("iptables after SIGTERM differ from before start:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// addForeignNATRules adds another sidecar's redirect (Istio-like) to ns: rules
// that imds-proxy must leave untouched.
func addForeignNATRules(t *testing.T, ns *testutil.Netns) {
	t.Helper()
	ns.Run(t, "iptables-nft", "-t", "nat", "-A", "OUTPUT", "-d", "10.0.0.1/32", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001")
	ns.Run(t, "ip6tables-nft", "-t", "nat", "-A", "OUTPUT", "-d", "fd00::1/128", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001")
}

// dialIn opens a TCP connection from inside ns.
func dialIn(t *testing.T, ns *testutil.Netns, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	var err error
	ns.Do(t, func() { c, err = net.DialTimeout("tcp", addr, 5*time.Second) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// getOn sends a keep-alive GET on c and returns the status, or 0 when the
// connection fails.
func getOn(t *testing.T, c net.Conn, path string) int {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	req, _ := http.NewRequest("GET", "http://169.254.169.254"+path, nil)
	if err := req.Write(c); err != nil {
		t.Logf("early connection: %v", err)
		return 0
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		t.Logf("early connection: %v", err)
		return 0
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// runSDK runs the demo client (the AWS SDK for Go v2) in ns against endpoint.
func runSDK(t *testing.T, ns *testutil.Netns, endpoint string) {
	t.Helper()
	cmd := ns.Command(demoClient, "--endpoint", endpoint, "--label", "sdk", "--calls", "3")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(),
		"AWS_CONFIG_FILE=/dev/null", "AWS_SHARED_CREDENTIALS_FILE=/dev/null"}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "i-1234567890abcdef0") {
		t.Errorf("AWS SDK in %s: %v\n%s", ns, err, out)
	}
}

// sidecarArgs is the command line of a sidecar that installs its rules in
// its namespace and serves IMDSv1 from IMDS at 169.254.169.254, followed
// by args.
func sidecarArgs(args ...string) []string {
	return append([]string{"sidecar", "--v1", "allow", "--listen", "127.0.0.1:8169", "--metrics-listen", "127.0.0.1:9169",
		"--upstream", "http://169.254.169.254"}, args...)
}

// nodeArgs is the command line of a node agent that serves IMDSv1 from
// IMDS at 169.254.169.254, on every address of the node, followed by args.
func nodeArgs(args ...string) []string {
	return append([]string{"node", "--v1", "allow", "--listen", ":8169", "--upstream", "http://169.254.169.254"}, args...)
}

// unprivileged is the setpriv command line that runs a program as uid
// (its group too) without capabilities.
func unprivileged(uid string) []string {
	return []string{"setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"}
}

func waitFor(t *testing.T, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestInitContainerSetup: `rules install --exempt-uid` as an init container
// would run it, then an unprivileged proxy (no capabilities, its own UID)
// with --rules=false; the proxy's upstream traffic passes by its UID. Then
// `rules remove` restores the namespace.
func TestInitContainerSetup(t *testing.T) {
	e := newSidecarEC2(t)
	addForeignNATRules(t, e.Task)
	before := saveRules(t, e.Task)
	const uid = "65534"
	e.Task.Run(t, binary, "rules", "install", "--mode", "sidecar", "--port", "8169", "--exempt-uid", uid, "--exempt-mark", "0", "--iptables-backend", "nft")

	testutil.StartProxy(t, e.Task, binary, sidecarArgs("--rules=false", "--exempt-uid", uid), testutil.Wrapped(unprivileged(uid)...))
	if status, body := e.Task.Get(t, "169.254.169.254:80", "/latest/meta-data/instance-id", nil); status != 200 || body != "i-1234567890abcdef0" {
		t.Errorf("tokenless GET through the init-container rules: %d %q, want 200 and the instance id", status, body)
	}
	// The init container's IPv6 rule redirects to [::1], where the
	// unprivileged sidecar listens too.
	if status, body := e.Task.Get(t, "[fd00:ec2::254]:80", "/latest/meta-data/instance-id", nil); status != 200 || body != "i-1234567890abcdef0" {
		t.Errorf("tokenless GET to [fd00:ec2::254] through the init-container rules: %d %q, want 200 and the instance id", status, body)
	}
	e.Task.Run(t, binary, "rules", "remove", "--mode", "sidecar", "--port", "8169", "--exempt-uid", uid, "--exempt-mark", "0", "--iptables-backend", "nft")
	if after := saveRules(t, e.Task); after != before {
		t.Errorf("rules remove did not restore the namespace:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestMisconfiguredExemptionIsDiagnosed: rules exempting a UID the proxy does
// not run as send its upstream requests back to itself; it must say so and
// answer 508 rather than recurse.
func TestMisconfiguredExemptionIsDiagnosed(t *testing.T) {
	e := newSidecarEC2(t)
	e.Task.Run(t, binary, "rules", "install", "--port", "8169", "--exempt-uid", "1234", "--exempt-mark", "0", "--iptables-backend", "nft")
	t.Cleanup(func() {
		_ = e.Task.Command(binary, "rules", "remove", "--port", "8169", "--exempt-uid", "1234", "--exempt-mark", "0", "--iptables-backend", "nft").Run()
	})
	proxy := testutil.StartProxy(t, e.Task, binary, sidecarArgs("--rules=false"), testutil.Wrapped(unprivileged("65534")...), testutil.UntilServing())
	if _, err := proxy.Logs.WaitFor("redirected back to this proxy", 10*time.Second); err != nil {
		t.Errorf("no loop diagnosis: %v\n%s", err, proxy.Logs.String())
	}
	proxy.WaitReady(t, e.Task)
	start := time.Now()
	status, _ := e.Task.Get(t, "169.254.169.254:80", "/latest/meta-data/instance-id", nil)
	if status != http.StatusLoopDetected {
		t.Errorf("tokenless GET through a looping proxy: %d, want 508", status)
	}
	if elapsed := time.Since(start); elapsed > 3*time.Second {
		t.Errorf("the looping request took %s; it must be refused at once, not time out", elapsed)
	}
}

// TestSidecarRunsWithTheManifestCapabilities runs the sidecar as the
// Kubernetes manifests and ECS task definitions run it: root holding only
// the capabilities they grant, with each iptables backend (the legacy one
// needs NET_RAW for its raw socket).
func TestSidecarRunsWithTheManifestCapabilities(t *testing.T) {
	var caps []string
	for _, c := range inject.Container(inject.DefaultOptions()).SecurityContext.Capabilities.Add {
		caps = append(caps, "+"+strings.ToLower(string(c)))
	}
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			e := newSidecarEC2(t)
			proxy := testutil.StartProxy(t, e.Task, binary, sidecarArgs("--iptables-backend", backend),
				testutil.Wrapped("setpriv", "--inh-caps=-all", "--bounding-set=-all,"+strings.Join(caps, ",")))
			if status, body := e.Task.Get(t, "169.254.169.254:80", "/latest/meta-data/instance-id", nil); status != 200 || body != "i-1234567890abcdef0" {
				t.Errorf("tokenless GET through the redirect with capabilities %v: %d %q, want 200\n%s", caps, status, body, proxy.Logs.String())
			}
			if strings.Contains(proxy.Logs.String(), "upstream connections are not marked") {
				t.Errorf("the proxy could not mark its sockets with %v:\n%s", caps, proxy.Logs.String())
			}
			proxy.Terminate(t)
			if saved := e.Task.IptablesSave(t, "iptables-"+backend+"-save"); strings.Contains(saved, "IMDS_PROXY") {
				t.Errorf("rules left after SIGTERM with capabilities %v:\n%s", caps, saved)
			}
		})
	}
}
