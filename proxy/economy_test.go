package proxy_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// TestCacheSparesTheUpstream: repeats of a path within the TTL cost one
// upstream request; fast-changing paths are fetched every time.
func TestCacheSparesTheUpstream(t *testing.T) {
	up := newFakeIMDS(t, requiringTokens(), numberedAnswers())
	h := startProxy(t, up.url, economical())
	auth := http.Header{imdsapi.TokenHeader: {h.token()}}
	for i := 0; i < 10; i++ {
		if r := h.do("GET", "/latest/meta-data/instance-id", auth); r.status != 200 || r.body != "answer /latest/meta-data/instance-id #1" {
			t.Fatalf("GET %d: %d %q", i, r.status, r.body)
		}
		h.do("GET", "/latest/meta-data/spot/instance-action", auth)
	}
	if got := up.count("/latest/meta-data/instance-id"); got != 1 {
		t.Errorf("10 GETs of instance-id cost %d upstream requests, want 1", got)
	}
	if got := up.count("/latest/meta-data/spot/instance-action"); got != 10 {
		t.Errorf("10 GETs of spot/instance-action cost %d upstream requests, want 10 (never cached)", got)
	}
	if hits := h.metric("imds_proxy_cache_requests_total", map[string]string{"result": "hit"}); hits != 9 {
		t.Errorf("cache hits %v, want 9", hits)
	}
}

// TestThrottledAndFailedAnswersAreRetried: 429s and 5xx are retried with
// backoff up to the attempt limit, and counted; past it the client gets
// the upstream's answer.
func TestThrottledAndFailedAnswersAreRetried(t *testing.T) {
	up := newFakeIMDS(t, requiringTokens(), numberedAnswers(), answeringStatus(func(path string, n int) int {
		switch {
		case strings.HasSuffix(path, "/throttled-twice") && n <= 2:
			return http.StatusTooManyRequests
		case strings.HasSuffix(path, "/always-failing"):
			return http.StatusServiceUnavailable
		}
		return 200
	}))
	h := startProxy(t, up.url, economical())
	auth := http.Header{imdsapi.TokenHeader: {h.token()}}
	if r := h.do("GET", "/latest/meta-data/throttled-twice", auth); r.status != 200 {
		t.Errorf("throttled twice: client got %d, want 200 from the third attempt", r.status)
	}
	if r := h.do("GET", "/latest/meta-data/always-failing", auth); r.status != http.StatusServiceUnavailable {
		t.Errorf("always failing: client got %d, want the upstream's 503", r.status)
	}
	if a, b := up.count("/latest/meta-data/throttled-twice"), up.count("/latest/meta-data/always-failing"); a != 3 || b != 3 {
		t.Errorf("upstream attempts: throttled %d, failing %d; want 3 and 3", a, b)
	}
	if got := h.metric("imds_proxy_upstream_retries_total", map[string]string{"cause": "throttled"}); got != 2 {
		t.Errorf("throttled retries counted %v, want 2", got)
	}
	if got := h.metric("imds_proxy_upstream_retries_total", map[string]string{"cause": "server_error"}); got != 2 {
		t.Errorf("server_error retries counted %v, want 2", got)
	}
}

// TestStaleCopyStandsInForUpstreamErrors: once the TTL has passed, an
// upstream error is answered with the cached copy while it is within
// StaleTTL; a path never fetched gets the error.
func TestStaleCopyStandsInForUpstreamErrors(t *testing.T) {
	var failing atomic.Bool
	up := newFakeIMDS(t, requiringTokens(), numberedAnswers(), answeringStatus(func(string, int) int {
		if failing.Load() {
			return http.StatusInternalServerError
		}
		return 200
	}))
	h := startProxy(t, up.url, economical(), configured(func(c *proxy.Config) { c.Cache.TTL = 20 * time.Millisecond }))
	auth := http.Header{imdsapi.TokenHeader: {h.token()}}
	first := h.do("GET", "/latest/meta-data/local-ipv4", auth)
	time.Sleep(30 * time.Millisecond)
	failing.Store(true)
	if r := h.do("GET", "/latest/meta-data/local-ipv4", auth); r.status != 200 || r.body != first.body {
		t.Errorf("with the upstream failing: %d %q, want the cached %q", r.status, r.body, first.body)
	}
	if r := h.do("GET", "/latest/meta-data/hostname", auth); r.status != http.StatusInternalServerError {
		t.Errorf("uncached path with the upstream failing: %d, want 500", r.status)
	}
	if got := h.metric("imds_proxy_cache_requests_total", map[string]string{"result": "stale"}); got != 1 {
		t.Errorf("stale answers counted %v, want 1", got)
	}
}

// TestCredentialBurstCostsIMDSAFewRequests: many SDK clients, each with its
// own IMDS client (nothing shared), fetch role credentials through one proxy
// at once; IMDS (amazon-ec2-metadata-mock behind a tap) sees a handful of
// requests instead of three per client.
func TestCredentialBurstCostsIMDSAFewRequests(t *testing.T) {
	isolateSDK(t)
	aemm := testutil.StartAEMM(t, append([]string{"-I"}, testutil.AEMMCredentialsExpiring(t, time.Now().Add(6*time.Hour))...)...)
	tap := testutil.NewTap(t, aemm.Addr)
	h := startProxy(t, tap.URL(), cachingDefaults())
	before := len(tap.Requests())

	// The SDK gives up after 500 ms per attempt; 100 clients keep a loaded
	// CI machine (-race, other packages in parallel) within that. make bench
	// runs 1,000.
	const clients = 100
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var failures atomic.Int32
	var firstErr atomic.Value
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			provider := ec2rolecreds.New(func(o *ec2rolecreds.Options) { o.Client = imds.New(imds.Options{Endpoint: h.url}) })
			creds, err := provider.Retrieve(ctx)
			if err != nil || creds.AccessKeyID != "ASIATESTFRESH" {
				failures.Add(1)
				firstErr.CompareAndSwap(nil, fmt.Sprintf("%q %v", creds.AccessKeyID, err))
			}
		}()
	}
	wg.Wait()
	upstream := tap.Requests()[before:]
	t.Logf("%d concurrent SDK credential fetches: %d upstream requests", clients, len(upstream))
	if failures.Load() > 0 {
		t.Errorf("%d of %d credential fetches failed, the first with %v", failures.Load(), clients, firstErr.Load())
	}
	if len(upstream) > 5 {
		t.Errorf("%d credential fetches cost IMDS %d requests, want at most 5", clients, len(upstream))
	}
}

// TestChainedProxiesDoNotMultiplyRetries: a sidecar in front of a node
// agent in front of a throttling IMDS sends IMDS the node agent's attempts
// only, not the product of both proxies' attempts.
func TestChainedProxiesDoNotMultiplyRetries(t *testing.T) {
	up := newFakeIMDS(t, requiringTokens(), numberedAnswers(), answeringStatus(func(string, int) int { return http.StatusTooManyRequests }))
	node := startProxy(t, up.url, economical(), configured(func(c *proxy.Config) { c.Mode = imdsapi.ModeNode }))
	sidecar := startProxy(t, node.url, economical())
	r := sidecar.do("GET", "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {sidecar.token()}})
	if r.status != http.StatusTooManyRequests || r.header.Get("X-Imds-Proxy") == "" {
		t.Errorf("client got %d (X-Imds-Proxy %q), want IMDS's 429 from a proxy", r.status, r.header.Get("X-Imds-Proxy"))
	}
	if got := up.count("/latest/meta-data/instance-id"); got != 3 {
		t.Errorf("IMDS saw %d GETs for one client request through two proxies, want 3 (the node agent's attempts)", got)
	}
}

// TestLifecycleStateIsNeverCached: Auto Scaling's target-lifecycle-state
// tells a workload to drain before termination, so every GET of it reaches
// IMDS and AEMM's change from InService to Terminated shows through the proxy
// at once (with the 5 s cache it showed up to 5 s late).
func TestLifecycleStateIsNeverCached(t *testing.T) {
	const path = "/latest/meta-data/autoscaling/target-lifecycle-state"
	const flipAfter = 3 * time.Second
	aemm := testutil.StartAEMM(t, "-I", "--asg-termination-delay-sec", fmt.Sprint(int(flipAfter.Seconds())))
	listening := time.Now() // AEMM counts its delay from its start, which was before this
	tap := testutil.NewTap(t, aemm.Addr)
	h := startProxy(t, tap.URL(), cachingDefaults())
	auth := http.Header{imdsapi.TokenHeader: {h.token()}}

	var answers []string
	for gets := 1; ; gets++ {
		before := len(tap.Requests())
		r := h.do("GET", path, auth)
		if r.status != 200 {
			t.Fatalf("GET %d: %d %q", gets, r.status, r.body)
		}
		if got := len(tap.Requests()) - before; got != 1 {
			t.Fatalf("GET %d (%q) cost %d upstream requests, want 1: answered from the cache", gets, r.body, got)
		}
		if len(answers) == 0 || answers[len(answers)-1] != r.body {
			answers = append(answers, r.body)
		}
		if r.body == "Terminated" {
			break
		}
		// AEMM has flipped by listening+flipAfter; one poll interval and a
		// request's time later the proxy must show it.
		if time.Since(listening) > flipAfter+time.Second {
			t.Fatalf("still %q %s after AEMM started, which flips to Terminated after %s; answers so far %q",
				r.body, time.Since(listening).Round(time.Millisecond), flipAfter, answers)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(answers) != 2 || answers[0] != "InService" {
		t.Errorf("answers through the proxy %q, want InService then Terminated", answers)
	}
	if n := h.metric("imds_proxy_cache_requests_total", map[string]string{"result": "hit"}); n != 0 {
		t.Errorf("%v cache hits, want none", n)
	}
}
