package proxy

import (
	"container/list"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"
)

// CacheConfig bounds the cache of upstream answers. A burst of identical
// requests (pods starting, SDKs refreshing together) then costs IMDS's
// link-local budget of about 1024 packets/s per ENI once.
type CacheConfig struct {
	// TTL is how long an answer is served from the cache; 0 disables it.
	TTL time.Duration
	// StaleTTL is how long past TTL an answer may still stand in for an
	// upstream error (429, 5xx, unreachable).
	StaleTTL time.Duration
	// MaxEntries and MaxBytes bound the cache; the least recently used
	// answers go first.
	MaxEntries int
	MaxBytes   int
	// CredentialMargin: role credentials are never served from the cache
	// later than this before their Expiration.
	CredentialMargin time.Duration
	// Uncached lists path segments whose paths are never cached: answers
	// that change without notice and must be seen at once (spot
	// interruptions, scheduled events, rebalance recommendations, Auto
	// Scaling's target-lifecycle-state).
	Uncached []string
}

func (c CacheConfig) validate() error {
	switch {
	case c.TTL < 0 || c.StaleTTL < 0 || c.CredentialMargin < 0:
		return fmt.Errorf("cache durations must not be negative")
	case c.TTL > 0 && (c.MaxEntries <= 0 || c.MaxBytes <= 0):
		return fmt.Errorf("cache: maximum entries and bytes must be positive (or the TTL 0 to disable it)")
	}
	return nil
}

// DefaultCacheConfig is the cache of the serving commands.
func DefaultCacheConfig() CacheConfig {
	return CacheConfig{
		TTL: 5 * time.Second, StaleTTL: 5 * time.Minute, MaxEntries: 1024, MaxBytes: 4 << 20,
		CredentialMargin: 5 * time.Minute, Uncached: []string{"spot", "events", "instance-action", "rebalance", "autoscaling"},
	}
}

// cache holds successful upstream answers by request key.
type cache struct {
	cfg   CacheConfig
	mu    sync.Mutex
	lru   *list.List // of *cacheEntry, most recent first
	byKey map[string]*list.Element
	bytes int
	now   func() time.Time
	// sized is told the size after every change (the metrics' gauges).
	sized func(entries, bytes int)
}

type cacheEntry struct {
	key        string
	response   *upstreamAnswer
	freshUntil time.Time // served as a hit until then
	staleUntil time.Time // served instead of an upstream error until then
}

// newCache returns the cache, or nil (no caching) when cfg.TTL is 0.
func newCache(cfg CacheConfig, sized func(entries, bytes int)) *cache {
	if cfg.TTL <= 0 {
		return nil
	}
	return &cache{cfg: cfg, lru: list.New(), byKey: map[string]*list.Element{}, now: time.Now, sized: sized}
}

// cacheable says whether path may be cached at all.
func (c *cache) cacheable(path string) bool {
	if c == nil || c.cfg.TTL <= 0 {
		return false
	}
	for _, segment := range strings.Split(path, "/") {
		for _, never := range c.cfg.Uncached {
			if segment == never {
				return false
			}
		}
	}
	return true
}

// fresh returns the answer for key if it is still fresh.
func (c *cache) fresh(key string) *upstreamAnswer {
	return c.lookup(key, func(e *cacheEntry, now time.Time) bool { return now.Before(e.freshUntil) })
}

// stale returns the answer for key if it may stand in for an error.
func (c *cache) stale(key string) *upstreamAnswer {
	return c.lookup(key, func(e *cacheEntry, now time.Time) bool { return now.Before(e.staleUntil) })
}

func (c *cache) lookup(key string, usable func(*cacheEntry, time.Time) bool) *upstreamAnswer {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.byKey[key]
	if !ok {
		return nil
	}
	e := el.Value.(*cacheEntry)
	now := c.now()
	if !now.Before(e.staleUntil) {
		c.removeLocked(el)
		return nil
	}
	if !usable(e, now) {
		return nil
	}
	c.lru.MoveToFront(el)
	return e.response
}

// store keeps a 200 answer for path under key, unless the answer is not
// worth keeping: an error, too large, or credentials close to expiry.
func (c *cache) store(key, path string, r *upstreamAnswer) {
	if r.status != 200 || !c.cacheable(path) || len(r.body) > c.cfg.MaxBytes/4 {
		return
	}
	now := c.now()
	e := &cacheEntry{key: key, response: r, freshUntil: now.Add(c.cfg.TTL), staleUntil: now.Add(c.cfg.TTL + c.cfg.StaleTTL)}
	if expiry, valid, credential := credentialExpiry(r.body); credential || isCredentialPath(path) {
		limit := expiry.Add(-c.cfg.CredentialMargin)
		if !valid || !now.Before(limit) {
			return
		}
		e.freshUntil, e.staleUntil = earliest(e.freshUntil, limit), earliest(e.staleUntil, limit)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.byKey[key]; ok {
		c.removeLocked(old)
	}
	c.byKey[key] = c.lru.PushFront(e)
	c.bytes += len(r.body)
	for c.lru.Len() > c.cfg.MaxEntries || c.bytes > c.cfg.MaxBytes {
		c.removeLocked(c.lru.Back())
	}
	c.sized(c.lru.Len(), c.bytes)
}

func (c *cache) removeLocked(el *list.Element) {
	e := c.lru.Remove(el).(*cacheEntry)
	delete(c.byKey, e.key)
	c.bytes -= len(e.response.body)
	c.sized(c.lru.Len(), c.bytes)
}

// isCredentialPath says whether path names role credentials
// (iam/security-credentials/<role>, identity-credentials/.../<name>): those
// are cached only with a readable Expiration, whatever their body looks like.
func isCredentialPath(path string) bool {
	_, name, found := strings.Cut(path, "/security-credentials/")
	return found && strings.Trim(name, "/") != ""
}

// credentialExpiry reads the Expiration of an IMDS credentials document
// ({"Code":"Success","AccessKeyId":...,"Expiration":"2026-11-26T10:00:00Z"}).
// credential is true for anything that looks like one; a credential
// without a readable Expiration has no valid expiry and is never cached.
func credentialExpiry(body []byte) (expiry time.Time, valid, credential bool) {
	if len(body) == 0 || body[0] != '{' {
		return time.Time{}, false, false
	}
	var doc struct{ AccessKeyId, Expiration string }
	if json.Unmarshal(body, &doc) != nil || doc.AccessKeyId == "" && doc.Expiration == "" {
		return time.Time{}, false, false
	}
	t, err := time.Parse(time.RFC3339, doc.Expiration)
	return t, err == nil, true
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
