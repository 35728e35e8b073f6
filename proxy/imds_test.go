package proxy_test

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// startBehindAEMM starts AEMM with IMDSv2 required, a tap in front of it, and
// a proxy whose upstream is the tap.
func startBehindAEMM(t *testing.T, opts ...harnessOption) (*harness, *testutil.Tap) {
	t.Helper()
	return startBehindAEMMWith(t, []string{"-I"}, opts...)
}

// startBehindAEMMWith is startBehindAEMM with AEMM started with args
// (none: IMDSv1 allowed, as HttpTokens=optional).
func startBehindAEMMWith(t *testing.T, args []string, opts ...harnessOption) (*harness, *testutil.Tap) {
	t.Helper()
	aemm := testutil.StartAEMM(t, args...)
	tap := testutil.NewTap(t, aemm.Addr)
	return startProxy(t, tap.URL(), opts...), tap
}

// TestTokenEndpoint covers every row of the IMDS table that the proxy
// answers itself: none of these requests may reach the upstream.
func TestTokenEndpoint(t *testing.T) {
	h, tap := startBehindAEMM(t)
	cases := []struct {
		name    string
		method  string
		header  http.Header
		status  int
		wantTTL string
	}{
		{"ttl 1", "PUT", http.Header{imdsapi.TokenTTLHeader: {"1"}}, 200, "1"},
		{"ttl 300 (Go SDK v2)", "PUT", http.Header{imdsapi.TokenTTLHeader: {"300"}}, 200, "300"},
		{"ttl 21600 (botocore, Java, JS)", "PUT", http.Header{imdsapi.TokenTTLHeader: {"21600"}}, 200, "21600"},
		{"ttl header lower case", "PUT", http.Header{"x-aws-ec2-metadata-token-ttl-seconds": {"60"}}, 200, "60"},
		{"ttl missing", "PUT", nil, 400, ""},
		{"ttl empty", "PUT", http.Header{imdsapi.TokenTTLHeader: {""}}, 400, ""},
		{"ttl non-numeric", "PUT", http.Header{imdsapi.TokenTTLHeader: {"abc"}}, 400, ""},
		{"ttl zero", "PUT", http.Header{imdsapi.TokenTTLHeader: {"0"}}, 400, ""},
		{"ttl above 21600", "PUT", http.Header{imdsapi.TokenTTLHeader: {"21601"}}, 400, ""},
		{"ttl negative", "PUT", http.Header{imdsapi.TokenTTLHeader: {"-5"}}, 400, ""},
		{"ttl float", "PUT", http.Header{imdsapi.TokenTTLHeader: {"1.5"}}, 400, ""},
		{"ttl repeated", "PUT", http.Header{imdsapi.TokenTTLHeader: {"300", "60"}}, 400, ""},
		{"x-forwarded-for", "PUT", http.Header{imdsapi.TokenTTLHeader: {"300"}, "X-Forwarded-For": {"10.1.2.3"}}, 403, ""},
		{"empty x-forwarded-for", "PUT", http.Header{imdsapi.TokenTTLHeader: {"300"}, "X-Forwarded-For": {""}}, 403, ""},
		{"GET", "GET", http.Header{imdsapi.TokenTTLHeader: {"300"}}, 405, ""},
		{"POST", "POST", http.Header{imdsapi.TokenTTLHeader: {"300"}}, 405, ""},
		{"DELETE", "DELETE", nil, 405, ""},
		{"HEAD", "HEAD", nil, 405, ""},
	}
	before := len(tap.Requests())
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := h.do(c.method, "/latest/api/token", c.header)
			if r.status != c.status {
				t.Fatalf("status %d, want %d (body %q)", r.status, c.status, r.body)
			}
			if got := r.header.Get(imdsapi.TokenTTLHeader); got != c.wantTTL {
				t.Errorf("%s = %q, want %q", imdsapi.TokenTTLHeader, got, c.wantTTL)
			}
			if c.status == 200 && len(r.body) < 40 {
				t.Errorf("token %q is too short to be unguessable", r.body)
			}
		})
	}
	if seen := tap.Requests()[before:]; len(seen) != 0 {
		t.Errorf("token requests reached the upstream: %+v", seen)
	}
	if got := h.metric("imds_proxy_tokens_minted_total", nil); got != 4 {
		t.Errorf("imds_proxy_tokens_minted_total = %v, want 4", got)
	}
}

// TestMetadataRequests covers token checking and the IMDSv1 policy, and
// checks what the upstream saw for each request.
func TestMetadataRequests(t *testing.T) {
	clock := &fakeClock{t: time.Now()}
	minter, err := token.NewMinter(bytes.Repeat([]byte{1}, token.KeySize), clock.Now)
	if err != nil {
		t.Fatal(err)
	}
	h, tap := startBehindAEMM(t, withMinter(minter))
	sessionToken := upstreamSessionToken(t, h, tap)
	valid := h.token()
	fromOther := h.tokenFrom(loopbackAddr("127.0.0.2"))
	shortLived := h.do("PUT", "/latest/api/token", http.Header{imdsapi.TokenTTLHeader: {"1"}}).body
	clock.advance(1500 * time.Millisecond) // shortLived is now expired; the others are not

	const path = "/latest/meta-data/instance-id"
	cases := []struct {
		name      string
		method    string
		header    http.Header
		status    int
		forwarded bool
	}{
		{"valid token", "GET", http.Header{imdsapi.TokenHeader: {valid}}, 200, true},
		{"valid token HEAD", "HEAD", http.Header{imdsapi.TokenHeader: {valid}}, 200, true},
		{"no token, v1 allowed", "GET", nil, 200, true},
		{"garbage token", "GET", http.Header{imdsapi.TokenHeader: {"not-a-token"}}, 401, false},
		{"expired token", "GET", http.Header{imdsapi.TokenHeader: {shortLived}}, 401, false},
		{"token of another caller", "GET", http.Header{imdsapi.TokenHeader: {fromOther}}, 401, false},
		{"upstream's own token", "GET", http.Header{imdsapi.TokenHeader: {sessionToken}}, 401, false},
		{"two token headers", "GET", http.Header{imdsapi.TokenHeader: {valid, valid}}, 400, false},
		{"POST", "POST", http.Header{imdsapi.TokenHeader: {valid}}, 405, false},
		{"PUT elsewhere", "PUT", http.Header{imdsapi.TokenHeader: {valid}}, 405, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := len(tap.Requests())
			r := h.do(c.method, path, c.header)
			if r.status != c.status {
				t.Fatalf("status %d, want %d (body %q)", r.status, c.status, r.body)
			}
			seen := tap.Requests()[before:]
			if !c.forwarded {
				if len(seen) != 0 {
					t.Fatalf("upstream saw %+v, want nothing", seen)
				}
				return
			}
			if len(seen) != 1 || seen[0].Method != c.method || seen[0].Path != path {
				t.Fatalf("upstream saw %+v, want one %s %s", seen, c.method, path)
			}
			if got := seen[0].Header.Values(imdsapi.TokenHeader); len(got) != 1 || got[0] != sessionToken {
				t.Errorf("upstream got token header %q, want only the proxy's session token", got)
			}
		})
	}
	h.assertNoSecretsLogged(valid, fromOther, sessionToken)
}

func TestIMDSv1Block(t *testing.T) {
	h, tap := startBehindAEMM(t, withV1(imdsapi.V1Block))
	before := len(tap.Requests())
	r := h.do("GET", "/latest/meta-data/iam/security-credentials/", http.Header{"User-Agent": {"Botocore/1.0 legacy"}})
	if r.status != http.StatusUnauthorized {
		t.Fatalf("tokenless GET with --v1 block: status %d, want 401", r.status)
	}
	if seen := tap.Requests()[before:]; len(seen) != 0 {
		t.Errorf("a blocked IMDSv1 request reached the upstream: %+v", seen)
	}
	warned := h.logsContaining("IMDSv1 request")
	if len(warned) != 1 || warned[0].ContextMap()["user_agent"] != "Botocore/1.0 legacy" {
		t.Errorf("want one IMDSv1 warning naming the User-Agent, got %+v", warned)
	}
	if got := h.metric("imds_proxy_requests_total", map[string]string{"outcome": "v1_blocked", "imds_version": "v1"}); got != 1 {
		t.Errorf("v1_blocked counter = %v, want 1", got)
	}
	// What block refuses, counted under block too: operators read it during a shutdown.
	if got := h.metric("imds_proxy_v1_would_block_total", nil); got != 1 {
		t.Errorf("imds_proxy_v1_would_block_total under --v1 block = %v, want 1", got)
	}
	if got := h.metric("imds_proxy_v1_requests_by_sdk_total", map[string]string{"sdk": "botocore"}); got != 1 {
		t.Errorf("imds_proxy_v1_requests_by_sdk_total{sdk=botocore} = %v, want 1", got)
	}
	h.do("GET", "/latest/meta-data/instance-id", http.Header{"User-Agent": nil})
	if got := h.metric("imds_proxy_v1_requests_by_sdk_total", map[string]string{"sdk": "unknown"}); got != 1 {
		t.Errorf("a tokenless request without a User-Agent (as the JS SDK sends) counted as sdk=unknown %v times, want 1", got)
	}
	tok := h.token()
	if r := h.do("GET", "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {tok}}); r.status != 200 {
		t.Errorf("IMDSv2 request with --v1 block: status %d, want 200", r.status)
	}
}

// upstreamSessionToken sends one tokenless request and returns the token the
// proxy put on it upstream: its own session token.
func upstreamSessionToken(t *testing.T, h *harness, tap *testutil.Tap) string {
	t.Helper()
	before := len(tap.Requests())
	if r := h.do("GET", "/latest/meta-data/", nil); r.status != 200 {
		t.Fatalf("warm-up GET: status %d", r.status)
	}
	seen := tap.Requests()[before:]
	if len(seen) != 1 || seen[0].Header.Get(imdsapi.TokenHeader) == "" {
		t.Fatalf("warm-up GET: upstream saw %+v, want one request with a token", seen)
	}
	return seen[0].Header.Get(imdsapi.TokenHeader)
}

// fakeClock is a clock the test moves forward; the proxy reads it concurrently.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// TestV1AutoFollowsTokensRequired: on an upstream that requires tokens
// (AEMM -I, as HttpTokens=required), the auto policy refuses tokenless
// requests as the upstream would, forwards nothing, and says so.
func TestV1AutoFollowsTokensRequired(t *testing.T) {
	h, tap := startBehindAEMM(t, withV1(imdsapi.V1Auto))
	probes := tokenlessSeen(tap)
	if len(probes) != 1 || probes[0].Path != "/latest/meta-data/" || probes[0].Header.Get("X-Imds-Proxy-Probe") == "" {
		t.Errorf("at start the upstream saw tokenless requests %+v, want the proxy's one probe of /latest/meta-data/", probes)
	}
	before := len(tap.Requests())
	if r := h.do("GET", "/latest/meta-data/iam/security-credentials/", nil); r.status != http.StatusUnauthorized || r.body != imdsErrorPage(401) {
		t.Errorf("tokenless GET under auto, upstream requiring tokens: status %d %q, want IMDS's 401", r.status, r.body)
	}
	if seen := tap.Requests()[before:]; len(seen) != 0 {
		t.Errorf("a refused tokenless request reached the upstream: %+v", seen)
	}
	if c := h.v1Callers(); len(c) != 1 || c[0].Count != 1 {
		t.Errorf("/v1-callers %+v: want the refused caller listed", c)
	}
	if n := h.metric("imds_proxy_v1_policy", map[string]string{"configured": "auto", "effective": "block"}); n != 1 {
		t.Errorf("imds_proxy_v1_policy{configured=auto,effective=block} = %v, want 1", n)
	}
	if n := h.metric("imds_proxy_upstream_v1_state", map[string]string{"state": "refused"}); n != 1 {
		t.Errorf("imds_proxy_upstream_v1_state{state=refused} = %v, want 1", n)
	}
	if l := h.logsContaining("--v1 auto refuses them here too"); len(l) != 1 {
		t.Errorf("want one log line saying auto follows the upstream, got %+v", l)
	}
	// A token still works: only IMDSv1 is refused.
	if r := h.do("GET", "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {h.token()}}); r.status != 200 {
		t.Errorf("IMDSv2 under auto: status %d, want 200", r.status)
	}
}

// TestV1AutoServesWhereTheUpstreamDoes: with IMDSv1 allowed upstream
// (HttpTokens=optional), auto serves tokenless requests as allow does.
func TestV1AutoServesWhereTheUpstreamDoes(t *testing.T) {
	h, _ := startBehindAEMMWith(t, nil, withV1(imdsapi.V1Auto))
	if r := h.do("GET", "/latest/meta-data/instance-id", nil); r.status != 200 || r.body != "i-1234567890abcdef0" {
		t.Errorf("tokenless GET under auto, upstream serving IMDSv1: %d %q, want 200 and the instance id", r.status, r.body)
	}
	if n := h.metric("imds_proxy_v1_policy", map[string]string{"configured": "auto", "effective": "allow"}); n != 1 {
		t.Errorf("imds_proxy_v1_policy{configured=auto,effective=allow} = %v, want 1", n)
	}
	if n := h.metric("imds_proxy_v1_would_block_total", nil); n != 1 {
		t.Errorf("imds_proxy_v1_would_block_total = %v, want 1", n)
	}
}

// TestV1AutoFollowsAChange: the instance is switched to HttpTokens=required
// (AEMM restarted with -I at the same address); auto refuses tokenless
// requests from the next session refresh on, or from the next probe between
// refreshes.
func TestV1AutoFollowsAChange(t *testing.T) {
	for name, mutate := range map[string]func(*proxy.Config){
		"at a session refresh":      func(c *proxy.Config) { c.UpstreamTokenTTL = 2 * time.Second },
		"between session refreshes": func(c *proxy.Config) { c.V1ProbeInterval = 200 * time.Millisecond },
	} {
		t.Run(name, func(t *testing.T) {
			addr := testutil.FreeLoopbackAddr(t)
			aemm := testutil.StartAEMMAt(t, addr)
			tap := testutil.NewTap(t, addr)
			h := startProxy(t, tap.URL(), quickV1Auto(), configured(mutate))
			if r := h.do("GET", "/latest/meta-data/instance-id", nil); r.status != 200 {
				t.Fatalf("tokenless GET before the switch: status %d, want 200", r.status)
			}
			aemm.Stop()
			testutil.StartAEMMAt(t, addr, "-I")
			if !eventually(10*time.Second, 50*time.Millisecond, func() bool {
				return h.do("GET", "/latest/meta-data/instance-id", nil).status == http.StatusUnauthorized
			}) {
				t.Fatal("auto still serves tokenless requests 10s after the upstream began to require tokens")
			}
			if l := h.logsContaining("--v1 auto refuses them here too"); len(l) != 1 {
				t.Errorf("want one log line for the switch, got %+v", l)
			}
		})
	}
}

// TestV1AutoFailsClosedUntilItKnows: while the probe gets no answer that
// tells (the front answers garbage to GETs, token PUTs pass), auto refuses
// tokenless requests and says why; once the upstream answers, auto follows
// it (AEMM here allows IMDSv1).
func TestV1AutoFailsClosedUntilItKnows(t *testing.T) {
	aemm := testutil.StartAEMM(t)
	front := newFakeIMDS(t, inFrontOf(aemm.Addr))
	front.fail(garbage)
	h := startProxy(t, front.url, quickV1Auto())
	if r := h.do("GET", "/latest/meta-data/instance-id", nil); r.status != http.StatusUnauthorized {
		t.Errorf("tokenless GET while the upstream's IMDSv1 policy is unknown: %d, want 401", r.status)
	}
	if l := h.logsContaining("cannot tell whether the upstream serves tokenless"); len(l) != 1 || l[0].ContextMap()["error"] == nil {
		t.Errorf("want one warning naming why auto cannot tell, got %+v", l)
	}
	if n := h.metric("imds_proxy_upstream_v1_state", map[string]string{"state": "unknown"}); n != 1 {
		t.Errorf("imds_proxy_upstream_v1_state{state=unknown} = %v, want 1", n)
	}
	front.fail(healthy)
	if !eventually(10*time.Second, 50*time.Millisecond, func() bool {
		return h.do("GET", "/latest/meta-data/instance-id", nil).status == http.StatusOK
	}) {
		t.Fatal("auto still refuses tokenless requests 10s after the upstream answered that it serves them")
	}
	if l := h.logsContaining("cannot tell whether"); len(l) != 1 {
		t.Errorf("the unknown policy was logged %d times, want once (not on every retry)", len(l))
	}
}

// TestV1AutoChained: a sidecar on auto whose upstream is a node agent sees
// the node agent's policy, which answers the sidecar's probe itself: an
// agent refusing IMDSv1 makes the sidecar refuse it, an agent explicitly
// allowing it makes the sidecar serve it. The probe is no IMDSv1 caller of
// the agent's.
func TestV1AutoChained(t *testing.T) {
	for _, c := range []struct {
		agent  imdsapi.V1Policy
		status int
	}{{imdsapi.V1Auto, 401}, {imdsapi.V1Allow, 200}} {
		t.Run("node agent "+string(c.agent), func(t *testing.T) {
			agent, imdsTap := startBehindAEMM(t, configured(func(cfg *proxy.Config) { cfg.V1 = c.agent; cfg.Mode = imdsapi.ModeNode }))
			agentTap := testutil.NewTap(t, agent.addr)
			sidecar := startProxy(t, agentTap.URL(), configured(func(cfg *proxy.Config) { cfg.V1, cfg.Mode = imdsapi.V1Auto, imdsapi.ModeSidecar }))
			if got := tokenlessSeen(agentTap); len(got) != 1 || got[0].Header.Get("X-Imds-Proxy-Probe") == "" {
				t.Errorf("the node agent saw tokenless requests %+v, want the sidecar's probe", got)
			}
			if got := tokenlessSeen(imdsTap); len(got) != 1 {
				t.Errorf("IMDS saw %d tokenless requests, want the node agent's own probe only (the sidecar's is answered by the agent)", len(got))
			}
			if r := sidecar.do("GET", "/latest/meta-data/instance-id", nil); r.status != c.status {
				t.Errorf("tokenless GET through the sidecar: %d, want %d", r.status, c.status)
			}
			if n := agent.metric("imds_proxy_requests_total", map[string]string{"outcome": "v1_policy_probe"}); n != 1 {
				t.Errorf("the node agent counted %v probes, want 1", n)
			}
			for _, caller := range agent.v1Callers() {
				if caller.UserAgent == "imds-proxy" {
					t.Errorf("the sidecar's probe is listed among the node agent's IMDSv1 callers: %+v", caller)
				}
			}
		})
	}
}

// quickV1Auto is --v1 auto, with the session retried within 200 ms.
func quickV1Auto() harnessOption {
	return configured(func(c *proxy.Config) {
		c.V1 = imdsapi.V1Auto
		c.UpstreamRetryMin, c.UpstreamRetryMax = 100*time.Millisecond, 200*time.Millisecond
	})
}

// tokenlessSeen is what the upstream behind tap received without a token.
func tokenlessSeen(tap *testutil.Tap) []testutil.SeenRequest {
	var out []testutil.SeenRequest
	for _, r := range tap.Requests() {
		if r.Method != http.MethodPut && r.Header.Get(imdsapi.TokenHeader) == "" {
			out = append(out, r)
		}
	}
	return out
}

// TestV1AllowOverTokensRequiredWarns: an explicit --v1 allow on such an
// upstream serves tokenless requests, and says once what it re-opens.
func TestV1AllowOverTokensRequiredWarns(t *testing.T) {
	h, _ := startBehindAEMM(t) // testConfig: allow
	for i := 0; i < 3; i++ {
		if r := h.do("GET", "/latest/meta-data/instance-id", nil); r.status != http.StatusOK {
			t.Fatalf("tokenless GET under explicit allow: status %d, want 200", r.status)
		}
	}
	if w := h.logsContaining("re-opens IMDSv1"); len(w) != 1 || w[0].Level != zapcore.WarnLevel {
		t.Errorf("want one warning that --v1 allow re-opens IMDSv1 the upstream refuses, got %+v", w)
	}
	if n := h.metric("imds_proxy_v1_policy", map[string]string{"configured": "allow", "effective": "allow"}); n != 1 {
		t.Errorf("imds_proxy_v1_policy{configured=allow,effective=allow} = %v, want 1", n)
	}
}

// TestV1BlockSendsNoProbe: block has no use for the upstream's IMDSv1
// policy, and sends no tokenless request upstream at all.
func TestV1BlockSendsNoProbe(t *testing.T) {
	h, tap := startBehindAEMM(t, withV1(imdsapi.V1Block))
	h.do("GET", "/latest/meta-data/", nil)
	if got := tokenlessSeen(tap); len(got) != 0 {
		t.Errorf("under block the upstream saw tokenless requests %+v", got)
	}
}

// imdsErrorPage is the body IMDS sends with an error status: its 404 page,
// as the AWS SDK for Go's tests quote it (aws/aws-sdk-go
// aws/ec2metadata/api_test.go), kept in testdata, with the status's title.
func imdsErrorPage(status int) string {
	page, err := os.ReadFile("testdata/imds-404.html")
	if err != nil {
		panic(err)
	}
	return strings.ReplaceAll(string(page), "404 - Not Found", fmt.Sprintf("%d - %s", status, http.StatusText(status)))
}

// TestErrorAnswersAreIMDSs: the answers the proxy makes itself carry the
// status, body and Content-Type IMDS sends with them, and still name the proxy.
func TestErrorAnswersAreIMDSs(t *testing.T) {
	policy, err := proxy.NewPathPolicy(nil, []string{"/latest/user-data"})
	if err != nil {
		t.Fatal(err)
	}
	h, _ := startBehindAEMM(t, withV1(imdsapi.V1Block), withPaths(policy))
	tok := h.token()
	cases := []struct {
		name, method, path string
		header             http.Header
		status             int
	}{
		{"tokenless, --v1 block", "GET", "/latest/meta-data/", nil, 401},
		{"bad token", "GET", "/latest/meta-data/", http.Header{imdsapi.TokenHeader: {"forged"}}, 401},
		{"two tokens", "GET", "/latest/meta-data/", http.Header{imdsapi.TokenHeader: {tok, tok}}, 400},
		{"undecodable path", "GET", "/latest/%252e%252e/", http.Header{imdsapi.TokenHeader: {tok}}, 400},
		{"path denied", "GET", "/latest/user-data", http.Header{imdsapi.TokenHeader: {tok}}, 403},
		{"POST", "POST", "/latest/meta-data/", http.Header{imdsapi.TokenHeader: {tok}}, 405},
		{"token GET", "GET", "/latest/api/token", nil, 405},
		{"token TTL missing", "PUT", "/latest/api/token", nil, 400},
		{"token TTL out of range", "PUT", "/latest/api/token", http.Header{imdsapi.TokenTTLHeader: {"21601"}}, 400},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := h.do(c.method, c.path, c.header)
			if r.status != c.status || r.body != imdsErrorPage(c.status) {
				t.Errorf("status %d body %q, want %d and IMDS's page %q", r.status, r.body, c.status, imdsErrorPage(c.status))
			}
			if ct := r.header.Get("Content-Type"); ct != "text/html" {
				t.Errorf("Content-Type %q, want IMDS's text/html", ct)
			}
			if r.header.Get("Server") != "EC2ws" || r.header.Get("X-Imds-Proxy") == "" {
				t.Errorf("Server %q, X-Imds-Proxy %q: want EC2ws and the proxy named", r.header.Get("Server"), r.header.Get("X-Imds-Proxy"))
			}
		})
	}
	// A token request with X-Forwarded-For: IMDS answers 403 with no body.
	r := h.do("PUT", "/latest/api/token", http.Header{imdsapi.TokenTTLHeader: {"60"}, "X-Forwarded-For": {"10.0.0.1"}})
	if r.status != 403 || r.body != "" || r.header.Get("Content-Type") != "text/plain" {
		t.Errorf("token PUT with X-Forwarded-For: %d %q (%s), want 403 with an empty text/plain body", r.status, r.body, r.header.Get("Content-Type"))
	}
}
