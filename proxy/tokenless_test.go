package proxy_test

import (
	"net/http"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// With V1Tokenless, a tokenless request the policy lets through reaches
// the upstream as it came, every time, so that the instance counts it as
// IMDSv1; a request with a token is still upgraded and cached.
func TestV1TokenlessReachesTheUpstreamAsItCame(t *testing.T) {
	const path = "/latest/meta-data/instance-id"
	imds := newFakeIMDS(t, recording())
	h := startProxy(t, imds.url, cachingDefaults(), configured(func(c *proxy.Config) { c.V1Tokenless = true }))
	imds.take() // the session's own requests

	for range 2 {
		if got := h.do(http.MethodGet, path, nil); got.status != http.StatusOK || got.body != fakeBody {
			t.Fatalf("tokenless GET: %d %q, want 200 %q", got.status, got.body, fakeBody)
		}
	}
	seen := imds.take()
	if len(seen) != 2 {
		t.Fatalf("the upstream saw %d requests for 2 tokenless ones, want each (no cache, no coalescing): %+v", len(seen), seen)
	}
	for _, r := range seen {
		if r.Path != path || r.Header.Get(imdsapi.TokenHeader) != "" {
			t.Errorf("the upstream saw %s with token %q, want %s without one", r.Path, r.Header.Get(imdsapi.TokenHeader), path)
		}
	}

	for range 2 {
		h.do(http.MethodGet, path, http.Header{imdsapi.TokenHeader: {h.token()}})
	}
	seen = imds.take()
	if len(seen) != 1 || seen[0].Header.Get(imdsapi.TokenHeader) != fakeSessionToken {
		t.Errorf("the upstream saw %+v for 2 IMDSv2 requests, want one with the session token, then the cache", seen)
	}
}

// An instance that requires tokens refuses a tokenless request that the
// proxy lets through: with V1Tokenless the client sees the instance's 401,
// and the proxy's session is not refreshed for it.
func TestV1TokenlessPassesTheInstancesRefusalOn(t *testing.T) {
	imds := newFakeIMDS(t, requiringTokens(), recording())
	h := startProxy(t, imds.url, configured(func(c *proxy.Config) { c.V1Tokenless = true }))
	imds.take()
	if got := h.do(http.MethodGet, "/latest/meta-data/instance-id", nil); got.status != http.StatusUnauthorized {
		t.Errorf("tokenless GET: %d, want the instance's 401", got.status)
	}
	for _, r := range imds.take() {
		if r.Method == http.MethodPut {
			t.Errorf("the instance's 401 to a tokenless request refreshed the session: %+v", r)
		}
	}
	if got := h.do(http.MethodGet, "/latest/meta-data/instance-id", http.Header{imdsapi.TokenHeader: {h.token()}}); got.status != http.StatusOK {
		t.Errorf("IMDSv2 GET beside it: %d, want 200", got.status)
	}
}
