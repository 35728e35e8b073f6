package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"syscall"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"golang.org/x/sync/singleflight"
)

// The forwarder's stages, each a method below, outermost first. Each adds
// one thing to the one after it:
//
//	RoundTrip    a fresh cached answer is served without asking anyone
//	coalesced    identical requests in flight share one answer
//	cached       a good answer is kept; a stale copy stands in for a failure
//	retried      throttles, server errors and lost connections are tried again
//	withSession  the session token is added; an upstream 401 refreshes it once
//	send         one upstream request, with the proxy's own headers only
//
// An answer of the proxy's own (no session, a refused session token) is an
// *ownAnswer, returned as the error: no stage caches, retries or passes it
// on as the upstream's.

// forwarder sends client requests to the upstream with the proxy's own
// session token. It is the transport of every forwarded request; the
// request it is given has been decided already, its path normalised and its
// headers cleared.
type forwarder struct {
	id          string // imdsapi.LoopHeader value
	upstream    *url.URL
	transport   http.RoundTripper
	session     *session
	metrics     *metrics
	bodyTimeout time.Duration
	coalesce    bool
	cache       *cache
	retry       RetryConfig
	flights     singleflight.Group
}

// RetryConfig bounds retries of upstream answers that say "try again":
// 429 (IMDS throttling) and 5xx, and connections refused or reset. Only
// idempotent requests reach the upstream (GET, HEAD), so each may be sent
// again. Timeouts are not retried: a hung upstream costs one timeout.
type RetryConfig struct {
	// Attempts is the most upstream requests one client request causes.
	// If zero, one (no retries).
	Attempts int
	// BaseDelay and MaxDelay bound the jittered exponential backoff.
	BaseDelay, MaxDelay time.Duration
}

// DefaultRetryConfig retries twice, waiting up to 50 ms then 100 ms.
func DefaultRetryConfig() RetryConfig {
	return RetryConfig{Attempts: 3, BaseDelay: 50 * time.Millisecond, MaxDelay: time.Second}
}

// maxSharedBody bounds an upstream answer, which is read whole to be
// shared, cached or retried; IMDS answers are small (user-data, the
// largest, is at most 16 KiB).
const maxSharedBody = 1 << 20

// RoundTrip answers req from the cache when it can, else from the upstream.
func (f *forwarder) RoundTrip(req *http.Request) (*http.Response, error) {
	if sentTokenless(req.Context()) {
		// The instance counts a request as IMDSv1 only if it arrives as
		// one: past the cache and coalescing, and without a session token
		// (withSession).
		answer, err := f.retried(req)
		if err != nil {
			return nil, err
		}
		return answer.response(req), nil
	}
	// The key is the whole upstream request: send adds only the proxy's own
	// headers (upstreamHeader), the same for every client.
	key := req.Method + " " + req.URL.Path
	cacheable := req.Method == http.MethodGet && f.cache.cacheable(req.URL.Path)
	if cacheable {
		if hit := f.cache.fresh(key); hit != nil {
			f.metrics.cache.WithLabelValues("hit").Inc()
			return hit.response(req), nil
		}
	}
	answer, err := f.coalesced(req, key, cacheable)
	if err != nil {
		return nil, err
	}
	return answer.response(req), nil
}

// coalesced runs the rest once for all identical requests in flight, so a
// burst of clients (a deployment starting, every SDK refreshing
// credentials) costs IMDS's link-local packet budget once.
func (f *forwarder) coalesced(req *http.Request, key string, cacheable bool) (*upstreamAnswer, error) {
	if !f.coalesce {
		return f.cached(req, key, cacheable)
	}
	led := false // only the leader's function runs; the others wait for its answer
	v, err, _ := f.flights.Do(key, func() (any, error) {
		led = true
		// The first caller's cancellation must not fail the others.
		budget := time.Duration(f.retry.Attempts+1) * f.bodyTimeout
		detached, cancel := context.WithTimeout(context.WithoutCancel(req.Context()), budget)
		defer cancel()
		return f.cached(req.WithContext(detached), key, cacheable) // send clones it before changing anything
	})
	if !led {
		f.metrics.cache.WithLabelValues("coalesced").Inc()
	}
	if err != nil {
		return nil, err
	}
	return v.(*upstreamAnswer), nil
}

// cached keeps a good answer, and stands a still-valid cached answer in
// for an upstream failure or an answer of the proxy's own.
func (f *forwarder) cached(req *http.Request, key string, cacheable bool) (*upstreamAnswer, error) {
	if !cacheable {
		f.metrics.cache.WithLabelValues("uncached").Inc()
		return f.retried(req)
	}
	f.metrics.cache.WithLabelValues("miss").Inc()
	answer, err := f.retried(req)
	if err == nil && !retryable(answer.status) {
		f.cache.store(key, req.URL.Path, answer)
		return answer, nil
	}
	if stale := f.cache.stale(key); stale != nil {
		f.metrics.cache.WithLabelValues("stale").Inc()
		return stale, nil
	}
	return answer, err
}

// retried asks until an answer will not change by asking again, within
// RetryConfig. The last attempt's answer or error is returned.
func (f *forwarder) retried(req *http.Request) (*upstreamAnswer, error) {
	for attempt := 1; ; attempt++ {
		answer, err := f.readWhole(f.withSession(req))
		cause := retryCause(answer, err)
		if cause == "" || attempt >= f.retry.Attempts || sleep(req.Context(), f.backoff(attempt)) != nil {
			return answer, err
		}
		f.metrics.upstreamRetries.WithLabelValues(cause).Inc()
	}
}

// withSession sends req according to the session state. An upstream 401
// to a request that carried the session token means the token went stale:
// the session is refreshed once (shared with concurrent callers) and the
// request sent once more.
func (f *forwarder) withSession(req *http.Request) (*http.Response, error) {
	if sentTokenless(req.Context()) {
		return f.send(req, "")
	}
	state, tok, err := f.session.current(req.Context())
	if err != nil {
		return nil, err
	}
	if state == stateDown {
		return nil, noSession()
	}
	resp, err := f.send(req, tok)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	discard(resp)
	if state == stateV1Fallback {
		// The upstream requires tokens and the proxy has none: a 401 would
		// only make the client fetch another proxy token and fail again.
		return nil, noSession()
	}
	if state, tok = f.session.refresh(tok); state != stateV2 {
		return nil, noSession()
	}
	if resp, err = f.send(req, tok); err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	// A fresh token refused too: passing the 401 on would tell the client
	// its own (valid) token is bad, and the SDK would only fetch another.
	discard(resp)
	return nil, plainAnswer(http.StatusBadGateway, outcomeUpstreamUnavailable, "imds-proxy: the upstream refused the proxy's session token")
}

// send makes one upstream request for req's method and path, with the
// proxy's headers only and the session token if there is one.
func (f *forwarder) send(req *http.Request, sessionToken string) (*http.Response, error) {
	out := req.Clone(req.Context())
	out.URL.Scheme, out.URL.Host, out.Host = f.upstream.Scheme, f.upstream.Host, f.upstream.Host
	out.Body = http.NoBody
	out.Close = false // a client closing its connection is no reason to close the pooled one to IMDS
	out.Header = upstreamHeader(f.id, sessionToken)
	start := time.Now()
	resp, err := f.transport.RoundTrip(out)
	f.metrics.upstreamLatency.WithLabelValues("metadata").Observe(time.Since(start).Seconds())
	return resp, err
}

// noSession is the answer while the proxy has no session with the upstream.
func noSession() *ownAnswer {
	return plainAnswer(http.StatusServiceUnavailable, outcomeUpstreamUnavailable,
		"imds-proxy has no IMDSv2 session with the upstream IMDS (see the proxy's log and "+
			"imds_proxy_upstream_session_state); the usual cause is the instance's metadata hop limit").
		with("Retry-After", "1")
}

// upstreamAnswer is an upstream answer read whole, to share with every
// coalesced caller, keep in the cache, or judge for a retry.
type upstreamAnswer struct {
	status int
	header http.Header
	body   []byte
}

var errTooLarge = errors.New("upstream response larger than 1 MiB")

// readWhole reads the answer of withSession whole.
func (f *forwarder) readWhole(resp *http.Response, err error) (*upstreamAnswer, error) {
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxSharedBody+1))
	if err != nil {
		return nil, err
	}
	if len(body) > maxSharedBody {
		return nil, errTooLarge
	}
	return &upstreamAnswer{status: resp.StatusCode, header: resp.Header, body: body}, nil
}

func (a *upstreamAnswer) response(req *http.Request) *http.Response {
	return &http.Response{
		Status: http.StatusText(a.status), StatusCode: a.status,
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: a.header.Clone(), Body: io.NopCloser(bytes.NewReader(a.body)),
		ContentLength: int64(len(a.body)), Request: req,
	}
}

func retryable(status int) bool {
	return status == http.StatusTooManyRequests || status >= 500 && status != http.StatusLoopDetected
}

// retryCause is the metric label of a retryable outcome, or "".
func retryCause(answer *upstreamAnswer, err error) string {
	var own *ownAnswer
	switch {
	case errors.As(err, &own):
		return "" // the proxy's own answer: the session is down, retrying won't help
	case err != nil && connectionLost(err):
		return "connection"
	case err != nil:
		return "" // a hang costs one timeout, not one per attempt; garbage stays garbage
	case answer.header.Get(imdsapi.ProxyHeader) != "":
		return "" // a chained imds-proxy has retried already: retrying again multiplies
	case answer.status == http.StatusTooManyRequests:
		return "throttled"
	case retryable(answer.status):
		return "server_error"
	}
	return ""
}

// connectionLost says whether err is a connection refused, reset or closed
// before the whole answer arrived: what a restarting or overloaded upstream
// does, and what the next attempt may not meet.
func connectionLost(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// backoff is a full-jitter exponential delay before retry number attempt.
func (f *forwarder) backoff(attempt int) time.Duration {
	ceiling := min(f.retry.BaseDelay<<(attempt-1), f.retry.MaxDelay)
	return time.Duration(rand.Int64N(int64(ceiling) + 1))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// discard drains a little of an unwanted body so the connection can be
// reused, and closes it.
func discard(resp *http.Response) {
	_, _ = io.CopyN(io.Discard, resp.Body, 4096)
	resp.Body.Close()
}
