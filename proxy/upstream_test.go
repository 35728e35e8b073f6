package proxy_test

import (
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// TestUpstreamTokenTimeout: after the first token request times out, client
// requests fall back to IMDSv1 upstream and never wait on that timeout again.
func TestUpstreamTokenTimeout(t *testing.T) {
	upstream := newFakeIMDS(t, answeringTokens(stallTokens))
	h := startProxy(t, upstream.url, configured(func(c *proxy.Config) { c.UpstreamTokenTimeout = 2 * time.Second })) // waits for the session to be decided: one timeout
	cfg, tok := h.cfg, h.token()

	var slowest time.Duration
	for i := 0; i < 100; i++ {
		start := time.Now()
		r := h.do("GET", "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {tok}})
		elapsed := time.Since(start)
		slowest = max(slowest, elapsed)
		if r.status != 200 || r.body != "i-0123456789abcdef0" {
			t.Fatalf("request %d: status %d body %q, want 200 from the upstream", i, r.status, r.body)
		}
		// Far below the timeout, so this cannot flake, yet any request
		// that waited on the token timeout would fail it.
		if elapsed >= cfg.UpstreamTokenTimeout/2 {
			t.Fatalf("request %d took %s: it waited on the upstream token timeout", i, elapsed)
		}
	}
	t.Logf("100 requests after the token timeout: slowest %s", slowest)
	if n := upstream.count(imdsapi.TokenPath); n != 1 {
		t.Errorf("upstream saw %d token PUTs, want 1 (retries belong in the background)", n)
	}
	diagnoses := h.logsContaining("hop-limit symptom")
	if len(diagnoses) != 1 || !strings.Contains(diagnoses[0].Message, "--http-put-response-hop-limit 2") {
		t.Errorf("want exactly one diagnosis naming the fix, got %d: %+v", len(diagnoses), diagnoses)
	}
	if v := h.metric("imds_proxy_upstream_session_state", map[string]string{"state": "v1_fallback"}); v != 1 {
		t.Errorf("session state v1_fallback = %v, want 1", v)
	}
	if v := h.metric("imds_proxy_upstream_token_failures_total", map[string]string{"cause": "timeout"}); v != 1 {
		t.Errorf("token failures with cause timeout = %v, want 1", v)
	}
}

func TestUpstreamTokenTimeoutWithoutFallback(t *testing.T) {
	upstream := newFakeIMDS(t, answeringTokens(stallTokens))
	h := startProxy(t, upstream.url, configured(func(c *proxy.Config) {
		c.UpstreamTokenTimeout = 500 * time.Millisecond
		c.UpstreamV1Fallback = false
	}))
	cfg, tok := h.cfg, h.token()
	for i := 0; i < 10; i++ {
		start := time.Now()
		r := h.do("GET", "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {tok}})
		if r.status != http.StatusServiceUnavailable || !strings.Contains(r.body, "hop limit") {
			t.Fatalf("status %d body %q, want 503 with an explanation", r.status, r.body)
		}
		if elapsed := time.Since(start); elapsed >= cfg.UpstreamTokenTimeout {
			t.Fatalf("request %d took %s: it waited on the upstream token timeout", i, elapsed)
		}
	}
	if v := h.metric("imds_proxy_upstream_session_state", map[string]string{"state": "down"}); v != 1 {
		t.Errorf("session state down = %v, want 1", v)
	}
}

// TestUpstream401RefreshesAndRetriesOnce restarts AEMM, which forgets the
// proxy's token: the next request gets 401 upstream, the proxy fetches a new
// token and retries, and the client sees only the 200.
func TestUpstream401RefreshesAndRetriesOnce(t *testing.T) {
	addr := testutil.FreeLoopbackAddr(t)
	aemm := testutil.StartAEMMAt(t, addr, "-I")
	tap := testutil.NewTap(t, addr)
	h := startProxy(t, tap.URL())
	tok := h.token()
	if r := h.do("GET", "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {tok}}); r.status != 200 {
		t.Fatalf("before restart: status %d", r.status)
	}
	aemm.Stop()
	testutil.StartAEMMAt(t, addr, "-I")

	before := len(tap.Requests())
	r := h.do("GET", "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {tok}})
	if r.status != 200 || r.body != "i-1234567890abcdef0" {
		t.Fatalf("after restart: status %d body %q, want 200 and the instance id", r.status, r.body)
	}
	var sequence []string
	for _, s := range tap.Requests()[before:] {
		sequence = append(sequence, s.Method)
	}
	if got := strings.Join(sequence, " "); got != "GET PUT GET" {
		t.Errorf("upstream saw %q, want \"GET PUT GET\" (stale token, one refresh, one retry)", got)
	}
}

// TestUpstreamFailuresAreShortAndOpaque: transport failures become 502 or 504
// with no internal detail for the client.
func TestUpstreamFailuresAreShortAndOpaque(t *testing.T) {
	t.Run("connection refused is 502", func(t *testing.T) {
		addr := testutil.FreeLoopbackAddr(t)
		aemm := testutil.StartAEMMAt(t, addr)
		h := startProxy(t, "http://"+addr)
		tok := h.token()
		aemm.Stop()
		r := h.do("GET", "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {tok}})
		assertOpaqueFailure(t, r, http.StatusBadGateway, addr)
	})
	t.Run("slow upstream is 504", func(t *testing.T) {
		slow := newFakeIMDS(t)
		slow.fail(hang)
		h := startProxy(t, slow.url, configured(func(c *proxy.Config) { c.UpstreamResponseTimeout = 300 * time.Millisecond }))
		tok := h.token()
		r := h.do("GET", "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {tok}})
		assertOpaqueFailure(t, r, http.StatusGatewayTimeout, slow.addr)
	})
}

func assertOpaqueFailure(t *testing.T, r response, status int, upstreamAddr string) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d body %q, want %d", r.status, r.body, status)
	}
	host, port, _ := net.SplitHostPort(upstreamAddr)
	for _, leak := range []string{host, port, "dial", "refused", "timeout", "goroutine", ".go:"} {
		if strings.Contains(r.body, leak) {
			t.Errorf("body %q reveals internal detail %q", r.body, leak)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	for name, mutate := range map[string]func(*proxy.Config){
		"https upstream":  func(c *proxy.Config) { c.Upstream.Scheme = "https" },
		"upstream path":   func(c *proxy.Config) { c.Upstream.Path = "/latest" },
		"no host":         func(c *proxy.Config) { c.Upstream.Host = "" },
		"bad policy":      func(c *proxy.Config) { c.V1 = "sometimes" },
		"zero ttl":        func(c *proxy.Config) { c.UpstreamTokenTTL = 0 },
		"huge ttl":        func(c *proxy.Config) { c.UpstreamTokenTTL = 7 * time.Hour },
		"no token wait":   func(c *proxy.Config) { c.UpstreamTokenTimeout = 0 },
		"negative dialer": func(c *proxy.Config) { c.UpstreamDialTimeout = -time.Second },
	} {
		cfg := testConfig("http://127.0.0.1:1")
		mutate(&cfg)
		if err := cfg.Validate(); err == nil {
			t.Errorf("%s: Validate accepted it", name)
		}
	}
	cfg := testConfig("http://169.254.169.254")
	if err := cfg.Validate(); err != nil {
		t.Errorf("default-like config rejected: %v", err)
	}
}

// TestNotReadyUntilSessionDecided: /readyz must not pass while the first
// upstream token request is still outstanding.
func TestNotReadyUntilSessionDecided(t *testing.T) {
	upstream := newFakeIMDS(t, answeringTokens(stallTokens))
	h := startProxy(t, upstream.url, beforeSessionDecided(), configured(func(c *proxy.Config) { c.UpstreamTokenTimeout = time.Second }))
	if err := h.p.Ready(); err == nil {
		t.Fatal("ready before the upstream session was decided")
	}
	h.waitReady()
}
