package proxy_test

import (
	"bytes"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// startBehindAEMM starts AEMM with IMDSv2 required, a tap in front of it, and
// a proxy whose upstream is the tap.
func startBehindAEMM(t *testing.T, mutate func(*proxy.Config), minter *token.Minter) (*harness, *testutil.Tap) {
	t.Helper()
	aemm := testutil.StartAEMM(t, "-I")
	tap := testutil.NewTap(t, aemm.Addr)
	cfg := testConfig(tap.URL())
	if mutate != nil {
		mutate(&cfg)
	}
	return startProxy(t, cfg, minter), tap
}

// TestTokenEndpoint covers every row of the IMDS table that the proxy
// answers itself: none of these requests may reach the upstream.
func TestTokenEndpoint(t *testing.T) {
	h, tap := startBehindAEMM(t, nil, nil)
	cases := []struct {
		name    string
		method  string
		header  http.Header
		status  int
		wantTTL string
	}{
		{"ttl 1", "PUT", http.Header{token.TTLHeader: {"1"}}, 200, "1"},
		{"ttl 300 (Go SDK v2)", "PUT", http.Header{token.TTLHeader: {"300"}}, 200, "300"},
		{"ttl 21600 (botocore, Java, JS)", "PUT", http.Header{token.TTLHeader: {"21600"}}, 200, "21600"},
		{"ttl header lower case", "PUT", http.Header{"x-aws-ec2-metadata-token-ttl-seconds": {"60"}}, 200, "60"},
		{"ttl missing", "PUT", nil, 400, ""},
		{"ttl empty", "PUT", http.Header{token.TTLHeader: {""}}, 400, ""},
		{"ttl non-numeric", "PUT", http.Header{token.TTLHeader: {"abc"}}, 400, ""},
		{"ttl zero", "PUT", http.Header{token.TTLHeader: {"0"}}, 400, ""},
		{"ttl above 21600", "PUT", http.Header{token.TTLHeader: {"21601"}}, 400, ""},
		{"ttl negative", "PUT", http.Header{token.TTLHeader: {"-5"}}, 400, ""},
		{"ttl float", "PUT", http.Header{token.TTLHeader: {"1.5"}}, 400, ""},
		{"ttl repeated", "PUT", http.Header{token.TTLHeader: {"300", "60"}}, 400, ""},
		{"x-forwarded-for", "PUT", http.Header{token.TTLHeader: {"300"}, "X-Forwarded-For": {"10.1.2.3"}}, 403, ""},
		{"empty x-forwarded-for", "PUT", http.Header{token.TTLHeader: {"300"}, "X-Forwarded-For": {""}}, 403, ""},
		{"GET", "GET", http.Header{token.TTLHeader: {"300"}}, 405, ""},
		{"POST", "POST", http.Header{token.TTLHeader: {"300"}}, 405, ""},
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
			if got := r.header.Get(token.TTLHeader); got != c.wantTTL {
				t.Errorf("%s = %q, want %q", token.TTLHeader, got, c.wantTTL)
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
	h, tap := startBehindAEMM(t, nil, minter)
	sessionToken := upstreamSessionToken(t, h, tap)
	valid := h.token()
	fromOther := h.tokenFrom(otherLoopback(t))
	shortLived := h.do("PUT", "/latest/api/token", http.Header{token.TTLHeader: {"1"}}).body
	clock.advance(1500 * time.Millisecond) // shortLived is now expired; the others are not

	const path = "/latest/meta-data/instance-id"
	cases := []struct {
		name      string
		method    string
		header    http.Header
		status    int
		forwarded bool
	}{
		{"valid token", "GET", http.Header{token.Header: {valid}}, 200, true},
		{"valid token HEAD", "HEAD", http.Header{token.Header: {valid}}, 200, true},
		{"no token, v1 allowed", "GET", nil, 200, true},
		{"garbage token", "GET", http.Header{token.Header: {"not-a-token"}}, 401, false},
		{"expired token", "GET", http.Header{token.Header: {shortLived}}, 401, false},
		{"token of another caller", "GET", http.Header{token.Header: {fromOther}}, 401, false},
		{"upstream's own token", "GET", http.Header{token.Header: {sessionToken}}, 401, false},
		{"two token headers", "GET", http.Header{token.Header: {valid, valid}}, 400, false},
		{"POST", "POST", http.Header{token.Header: {valid}}, 405, false},
		{"PUT elsewhere", "PUT", http.Header{token.Header: {valid}}, 405, false},
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
			if got := seen[0].Header.Values(token.Header); len(got) != 1 || got[0] != sessionToken {
				t.Errorf("upstream got token header %q, want only the proxy's session token", got)
			}
		})
	}
	h.assertNoSecretsLogged(valid, fromOther, sessionToken)
}

func TestIMDSv1Block(t *testing.T) {
	h, tap := startBehindAEMM(t, func(c *proxy.Config) { c.V1 = proxy.V1Block }, nil)
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
	tok := h.token()
	if r := h.do("GET", "/latest/meta-data/instance-id", http.Header{token.Header: {tok}}); r.status != 200 {
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
	if len(seen) != 1 || seen[0].Header.Get(token.Header) == "" {
		t.Fatalf("warm-up GET: upstream saw %+v, want one request with a token", seen)
	}
	return seen[0].Header.Get(token.Header)
}

// otherLoopback is a second local address, so that a request comes from a
// different caller than 127.0.0.1.
func otherLoopback(t *testing.T) net.Addr {
	t.Helper()
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}
}

func (h *harness) tokenFrom(local net.Addr) string {
	h.t.Helper()
	r := h.doFrom(local, "PUT", "/latest/api/token", http.Header{token.TTLHeader: {"300"}})
	if r.status != 200 {
		h.t.Fatalf("token PUT from %v: status %d", local, r.status)
	}
	return r.body
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
