package proxy

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// clock is a settable time source for the cache.
type clock struct{ t time.Time }

// sizes is what the cache last reported of its size.
type sizes struct{ entries, bytes int }

func (c *clock) now() time.Time { return c.t }

func testCache(cfg CacheConfig) (*cache, *clock, *sizes) {
	clk := &clock{t: time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)}
	sz := &sizes{}
	c := newCache(cfg, func(e, b int) { sz.entries, sz.bytes = e, b })
	c.now = clk.now
	return c, clk, sz
}

func answer(status int, body string) *upstreamAnswer {
	return &upstreamAnswer{status: status, header: http.Header{}, body: []byte(body)}
}

// TestCacheFreshThenStaleThenGone: an answer is fresh for TTL, may stand in
// for errors for StaleTTL more, and is gone after.
func TestCacheFreshThenStaleThenGone(t *testing.T) {
	c, clk, sz := testCache(DefaultCacheConfig())
	c.store("k", "/latest/meta-data/instance-id", answer(200, "i-1"))
	steps := []struct {
		after        time.Duration
		fresh, stale bool
	}{{0, true, true}, {4 * time.Second, true, true}, {5 * time.Second, false, true}, {5*time.Minute + 4*time.Second, false, true}, {5*time.Minute + 5*time.Second, false, false}}
	start := clk.t
	for _, s := range steps {
		clk.t = start.Add(s.after)
		if got := c.fresh("k") != nil; got != s.fresh {
			t.Errorf("after %s: fresh %t, want %t", s.after, got, s.fresh)
		}
		if got := c.stale("k") != nil; got != s.stale {
			t.Errorf("after %s: stale %t, want %t", s.after, got, s.stale)
		}
	}
	if entries := sz.entries; entries != 0 {
		t.Errorf("%d entries left after expiry", entries)
	}
}

// TestCacheKeepsOnlyWhatItShould: errors, 401s, time-sensitive paths (spot,
// events, rebalance, Auto Scaling lifecycle) and credentials near or past
// expiry are never stored. (The proxy's own answers never reach the cache:
// they are ownAnswer errors, not upstream answers.)
func TestCacheKeepsOnlyWhatItShould(t *testing.T) {
	c, clk, _ := testCache(DefaultCacheConfig())
	creds := func(expiry time.Time) string {
		return fmt.Sprintf(`{"Code":"Success","AccessKeyId":"ASIA","SecretAccessKey":"s","Token":"t","Expiration":%q}`, expiry.Format(time.RFC3339))
	}
	never := map[string]struct {
		path string
		r    *upstreamAnswer
	}{
		"404":                   {"/latest/meta-data/nope", answer(404, "")},
		"401":                   {"/latest/meta-data/instance-id", answer(401, "")},
		"500":                   {"/latest/meta-data/instance-id", answer(500, "")},
		"spot":                  {"/latest/meta-data/spot/instance-action", answer(200, "{}")},
		"events":                {"/latest/meta-data/events/maintenance/scheduled", answer(200, "[]")},
		"rebalance":             {"/latest/meta-data/events/recommendations/rebalance", answer(200, "{}")},
		"autoscaling":           {"/latest/meta-data/autoscaling/target-lifecycle-state", answer(200, "InService")},
		"expired credentials":   {"/latest/meta-data/iam/security-credentials/r", answer(200, creds(clk.t.Add(-time.Hour)))},
		"credentials in margin": {"/latest/meta-data/iam/security-credentials/r", answer(200, creds(clk.t.Add(4*time.Minute)))},
		"no Expiration":         {"/latest/meta-data/iam/security-credentials/r", answer(200, `{"AccessKeyId":"ASIA","Expiration":"soon"}`)},
	}
	for name, n := range never {
		c.store(name, n.path, n.r)
		if c.stale(name) != nil {
			t.Errorf("%s was cached", name)
		}
	}
	// Credentials expiring in 6 minutes: fresh for the TTL, and never
	// served, even stale, past Expiration minus the 5-minute margin.
	c.store("creds", "/latest/meta-data/iam/security-credentials/r", answer(200, creds(clk.t.Add(6*time.Minute))))
	start := clk.t
	if c.fresh("creds") == nil {
		t.Fatal("credentials with 6 minutes left were not cached")
	}
	c.store("roles", "/latest/meta-data/iam/security-credentials/", answer(200, "r"))
	if c.fresh("roles") == nil {
		t.Error("the list of roles (not credentials) was not cached")
	}
	clk.t = start.Add(59 * time.Second)
	if c.stale("creds") == nil {
		t.Error("credentials not available as a stand-in before Expiration minus the margin")
	}
	clk.t = start.Add(time.Minute)
	if c.stale("creds") != nil {
		t.Error("credentials served at Expiration minus the margin")
	}
}

// TestCacheBounds: entries and bytes stay within their limits, evicting
// the least recently used.
func TestCacheBounds(t *testing.T) {
	c, _, sz := testCache(CacheConfig{TTL: time.Minute, MaxEntries: 3, MaxBytes: 400})
	for i := 0; i < 3; i++ {
		c.store(fmt.Sprint(i), "/p", answer(200, "x"))
	}
	c.fresh("0") // 0 is now the most recently used
	c.store("3", "/p", answer(200, "x"))
	if c.fresh("1") != nil || c.fresh("0") == nil || c.fresh("3") == nil {
		t.Error("the least recently used entry was not the one evicted")
	}
	c.store("big", "/p", answer(200, strings.Repeat("b", 100)))
	c.store("big2", "/p", answer(200, strings.Repeat("b", 100)))
	c.store("too big", "/p", answer(200, strings.Repeat("b", 101))) // over MaxBytes/4: never stored
	entries, bytes := sz.entries, sz.bytes
	if entries > 3 || bytes > 400 || c.fresh("too big") != nil {
		t.Errorf("cache holds %d entries, %d bytes; want at most 3 and 400, without the oversized answer", entries, bytes)
	}
}
