package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http/httpproxy"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// binary, kubernetesBinary (the build with the Kubernetes source),
// workloadRoleBinary (the build with the AWS SDK's credential providers)
// and demoClient are built once for these tests.
var binary, kubernetesBinary, workloadRoleBinary, demoClient string

func TestMain(m *testing.M) {
	bins, err := testutil.BuildBinaries()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary, kubernetesBinary, workloadRoleBinary, demoClient = bins.Proxy, bins.ProxyKubernetes, bins.ProxyWorkloadRole, bins.DemoClient
	code := m.Run()
	bins.Remove()
	os.Exit(code)
}

// startBinary runs imds-proxy sidecar without rules on loopback, with args
// and env on top of a clean environment, and waits for its "serving" line
// (not for /readyz: see waitReady).
func startBinary(t *testing.T, env []string, args ...string) *testutil.Process {
	t.Helper()
	return testutil.StartProxy(t, nil, binary, testutil.LoopbackSidecar(append([]string{"--log-level", "debug"}, args...)...),
		testutil.WithEnv(env...), testutil.UntilServing())
}

// get sends a request with an http.Client that never uses a proxy.
func get(t *testing.T, method, rawURL string, header http.Header) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, rawURL, nil)
	for k, v := range header {
		req.Header[k] = v
	}
	client := &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 20 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, rawURL, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// waitReady waits for a proxy startBinary started to answer /readyz with 200.
func waitReady(t *testing.T, r *testutil.Process) {
	t.Helper()
	r.WaitReady(t, nil)
}

func TestHelpExplainsEveryFlag(t *testing.T) {
	out, err := exec.Command(binary, "sidecar", "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("sidecar --help: %v\n%s", err, out)
	}
	for _, want := range []string{"-listen", "-metrics-listen", "-upstream", "-v1", "-upstream-v1-fallback",
		"-upstream-token-ttl", "-upstream-token-timeout", "-upstream-retry-min", "-upstream-retry-max",
		"-upstream-dial-timeout", "-upstream-response-timeout", "-shutdown-timeout", "-rules",
		"-keep-rules-on-exit", "-exempt-mark", "-exempt-uid", "-iptables-backend", "-reconcile-interval", "-ipv6",
		"-log-format", "-log-level", "-allow-path", "-deny-path", "-config", "-cache-ttl", "-cache-stale-ttl",
		"-cache-max-entries", "-cache-max-bytes", "-cache-credential-margin", "-cache-uncached", "-upstream-attempts",
		"-coalesce", "-max-connections", "-max-connections-per-client", "-read-header-timeout", "-idle-timeout", "-max-header-bytes", "-pprof-listen", "IMDS_PROXY_"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("sidecar --help does not mention %s", want)
		}
	}
	out, err = exec.Command(binary, "node", "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("node --help: %v\n%s", err, out)
	}
	for _, want := range []string{"-interfaces", "-node-address", "cali+,lxc+", "127.0.0.1:9169"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("node --help does not mention %s", want)
		}
	}
	out, err = exec.Command(binary, "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("--help: %v\n%s", err, out)
	}
	for _, sub := range []string{"sidecar", "node", "rules", "doctor", "ready", "inject", "webhook", "version"} {
		if !strings.Contains(string(out), sub) {
			t.Errorf("--help does not list %s", sub)
		}
	}
}

func TestBadInputGetsAClearError(t *testing.T) {
	occupied, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer occupied.Close()
	cases := map[string]struct {
		args []string
		env  []string
		want string
	}{
		"bad policy":                          {[]string{"--v1", "sometimes"}, nil, "unknown IMDSv1 policy"},
		"bad policy from env":                 {nil, []string{"IMDS_PROXY_V1=sometimes"}, "unknown IMDSv1 policy"},
		"https upstream":                      {[]string{"--upstream", "https://169.254.169.254"}, nil, "scheme must be http"},
		"bad log level":                       {[]string{"--log-level", "loud"}, nil, "--log-level"},
		"listen in use":                       {[]string{"--listen", occupied.Addr().String()}, nil, "--listen"},
		"bad backend":                         {[]string{"--rules=true", "--iptables-backend", "iptables9"}, nil, "unknown iptables backend"},
		"rules need a port":                   {[]string{"--rules=true", "--listen", "127.0.0.1:0"}, nil, "fixed port"},
		"stray argument":                      {[]string{"extra"}, nil, "unexpected arguments"},
		"exempt UID not ours":                 {[]string{"--exempt-mark", "0", "--exempt-uid", "4321"}, nil, "redirected back to itself"},
		"exempt UID 0":                        {[]string{"--rules=true", "--exempt-uid", "0"}, nil, "UID 0"},
		"node on every address without rules": {[]string{"--listen", ":0"}, nil, "without --rules"},
		"node address on loopback":            {[]string{"--rules=true", "--node-address", "127.0.0.1"}, nil, "route_localnet"},
		"node address not IPv4":               {[]string{"--rules=true", "--node-address", "fd00::1"}, nil, "want an IPv4 address"},
		"node address auto over loopback":     {[]string{"--rules=true"}, nil, "over loopback"},
		"node address not listened on":        {[]string{"--rules=true", "--listen", "10.1.1.1:8169", "--node-address", "10.2.2.2"}, nil, "does not listen on it"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			mode := "sidecar"
			if strings.HasPrefix(name, "node") {
				mode = "node"
			}
			args := append([]string{mode, "--rules=false", "--metrics-listen", "", "--upstream", "http://127.0.0.1:1"}, c.args...)
			cmd := exec.Command(binary, args...)
			cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, c.env...)
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 1 {
				t.Fatalf("exit: %v, want status 1\n%s", err, out)
			}
			if !strings.Contains(string(out), c.want) {
				t.Errorf("output %q does not say %q", out, c.want)
			}
		})
	}
}

// TestEnvironmentAndFlags: every flag has an IMDS_PROXY_ variable, and a flag
// given on the command line wins over it.
func TestEnvironmentAndFlags(t *testing.T) {
	aemm := testutil.StartAEMM(t, "-I")
	env := []string{"IMDS_PROXY_UPSTREAM=" + aemm.URL, "IMDS_PROXY_V1=block"}

	fromEnv := startBinary(t, env)
	waitReady(t, fromEnv)
	if status, _ := get(t, "GET", fromEnv.API+"/latest/meta-data/instance-id", nil); status != 401 {
		t.Errorf("IMDS_PROXY_V1=block: tokenless GET got %d, want 401", status)
	}

	if status, body := get(t, "GET", fromEnv.Metrics+"/metrics", nil); status != 200 ||
		!strings.Contains(body, `imds_proxy_requests_total{imds_version="v1",method="GET",outcome="v1_blocked"} 1`) {
		t.Errorf("/metrics: %d, want 200 counting the blocked request:\n%s", status, body)
	}
	if status, body := get(t, "GET", fromEnv.Metrics+"/v1-callers", nil); status != 200 || !strings.Contains(body, `"caller":"127.0.0.1"`) {
		t.Errorf("/v1-callers: %d %s, want the blocked caller", status, body)
	}
	if status, _ := get(t, "GET", fromEnv.Metrics+"/healthz", nil); status != 200 {
		t.Errorf("/healthz: %d, want 200", status)
	}

	flagWins := startBinary(t, env, "--v1", "allow")
	waitReady(t, flagWins)
	if status, body := get(t, "GET", flagWins.API+"/latest/meta-data/instance-id", nil); status != 200 || body != "i-1234567890abcdef0" {
		t.Errorf("--v1 allow over IMDS_PROXY_V1=block: tokenless GET got %d %q, want 200 from AEMM", status, body)
	}
}

// TestIgnoresProxyEnvironment: with HTTP_PROXY pointing at a trap, the proxy
// still goes straight to its upstream. The upstream is addressed as 0.0.0.0,
// which Linux connects to the local host, because Go's proxy rules never
// proxy loopback addresses and the test would prove nothing with 127.0.0.1.
func TestIgnoresProxyEnvironment(t *testing.T) {
	aemm := testutil.StartAEMM(t, "-I")
	trap := testutil.NewTap(t, "")
	upstream := strings.Replace(aemm.URL, "127.0.0.1", "0.0.0.0", 1)
	proxyEnv := &httpproxy.Config{HTTPProxy: trap.URL(), HTTPSProxy: trap.URL()}
	if u, _ := proxyEnv.ProxyFunc()(mustParse(t, upstream)); u == nil {
		t.Fatalf("control: HTTP_PROXY would not apply to %s, so this test would prove nothing", upstream)
	}
	env := []string{"HTTP_PROXY=" + trap.URL(), "http_proxy=" + trap.URL(), "HTTPS_PROXY=" + trap.URL(), "ALL_PROXY=" + trap.URL()}
	r := startBinary(t, env, "--upstream", upstream)
	waitReady(t, r)
	status, tok := get(t, "PUT", r.API+"/latest/api/token", http.Header{"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": {"60"}})
	if status != 200 {
		t.Fatalf("token PUT: %d", status)
	}
	status, body := get(t, "GET", r.API+"/latest/meta-data/instance-id", http.Header{"X-Aws-Ec2-Metadata-Token": {tok}})
	if status != 200 || body != "i-1234567890abcdef0" {
		t.Errorf("GET through the proxy: %d %q, want 200 from AEMM", status, body)
	}
	if n := trap.Conns(); n != 0 {
		t.Errorf("the HTTP_PROXY trap received %d connections", n)
	}
}

// TestSIGTERMFinishesInFlightRequests: on SIGTERM the proxy stops accepting,
// lets a request already in flight finish, and exits 0.
func TestSIGTERMFinishesInFlightRequests(t *testing.T) {
	aemm := testutil.StartAEMM(t) // IMDSv1 allowed so the request below needs no token
	slow := testutil.NewDelayingTap(t, aemm.Addr, time.Second)
	r := startBinary(t, nil, "--upstream", slow.URL(), "--upstream-token-timeout", "5s")
	waitReady(t, r)

	result := make(chan string, 1)
	go func() {
		resp, err := http.Get(r.API + "/latest/meta-data/instance-id")
		if err != nil {
			result <- err.Error()
			return
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		result <- fmt.Sprint(resp.StatusCode, " ", string(body))
	}()
	if err := slow.WaitRequests(3, 10*time.Second); err != nil { // the proxy's token PUT, its IMDSv1 probe, then the GET
		t.Fatal(err)
	}
	if err := r.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if got := <-result; got != "200 i-1234567890abcdef0" {
		t.Errorf("in-flight request during shutdown got %q, want 200 and the instance id\n%s", got, r.Logs.String())
	}
	if err := r.WaitExit(t, 10*time.Second); err != nil {
		t.Errorf("exit after SIGTERM: %v, want status 0\n%s", err, r.Logs.String())
	}
	if _, err := http.Get(r.API + "/"); err == nil {
		t.Error("the listener still accepts connections after shutdown")
	}
}

// TestPprofListener: --pprof-listen serves Go's profiles on its own listener.
func TestPprofListener(t *testing.T) {
	addr := testutil.FreeLoopbackAddr(t)
	startBinary(t, nil, "--upstream", "http://127.0.0.1:1", "--pprof-listen", addr)
	if status, body := get(t, "GET", "http://"+addr+"/debug/pprof/", nil); status != 200 || !strings.Contains(body, "goroutine") {
		t.Errorf("/debug/pprof/: %d %.80q", status, body)
	}
}

func TestVersion(t *testing.T) {
	out, err := exec.Command(binary, "version").Output()
	if err != nil || !strings.HasPrefix(string(out), "imds-proxy ") {
		t.Errorf("version: %q, %v", out, err)
	}
}

func mustParse(t *testing.T, raw string) *url.URL {
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// TestConfigFile: policy from a YAML --config, with flags winning over it and
// unknown keys refused.
func TestConfigFile(t *testing.T) {
	aemm := testutil.StartAEMM(t, "-I")
	cfg := filepath.Join(t.TempDir(), "imds-proxy.yaml")
	yaml := "upstream: " + aemm.URL + "\nv1: block\ndeny-path:\n  - /latest/user-data\n  - /latest/meta-data/iam/\n"
	if err := os.WriteFile(cfg, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startBinary(t, nil, "--config", cfg)
	waitReady(t, r)
	if status, _ := get(t, "GET", r.API+"/latest/meta-data/instance-id", nil); status != 401 {
		t.Errorf("v1: block from the config file: tokenless GET got %d, want 401", status)
	}
	_, tok := get(t, "PUT", r.API+"/latest/api/token", http.Header{"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": {"60"}})
	if status, _ := get(t, "GET", r.API+"/latest/meta-data/iam/info", http.Header{"X-Aws-Ec2-Metadata-Token": {tok}}); status != 403 {
		t.Errorf("deny-path from the config file: got %d, want 403", status)
	}

	flagWins := startBinary(t, nil, "--config", cfg, "--v1", "allow")
	waitReady(t, flagWins)
	if status, _ := get(t, "GET", flagWins.API+"/latest/meta-data/instance-id", nil); status != 200 {
		t.Errorf("--v1 allow over the config file: tokenless GET got %d, want 200", status)
	}

	bad := filepath.Join(t.TempDir(), "bad.yaml")
	_ = os.WriteFile(bad, []byte("v1-policy: block\n"), 0o600)
	out, err := exec.Command(binary, "sidecar", "--rules=false", "--config", bad).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "v1-policy") {
		t.Errorf("unknown key in --config: %v, %q; want an error naming it", err, out)
	}
}
