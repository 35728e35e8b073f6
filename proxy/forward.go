package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/elazarl/goproxy"
	"golang.org/x/sync/singleflight"
)

// forwarder sends client requests to the upstream with the proxy's own
// session token. It is the goproxy RoundTripper of every forwarded request.
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

// maxSharedBody bounds an upstream answer, which is read whole to be
// shared, cached or retried; IMDS answers are small (user-data, the
// largest, is at most 16 KiB).
const maxSharedBody = 1 << 20

// RoundTrip answers req from the cache when it can, else from the
// upstream. Identical requests in flight at the same time share one
// upstream request, so a burst of clients (a deployment starting, every
// SDK refreshing credentials) costs IMDS's link-local packet budget once.
func (f *forwarder) RoundTrip(req *http.Request, ctx *goproxy.ProxyCtx) (*http.Response, error) {
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
	obtain := func(r *http.Request) (*sharedResponse, error) { return f.obtain(r, key, cacheable) }
	shared, err := f.shared(req, key, obtain)
	if err != nil {
		return nil, err
	}
	markUnavailable(ctx, shared.unavailable)
	return shared.response(req), nil
}

// shared runs obtain once for all identical requests in flight, or for
// req alone when coalescing is off.
func (f *forwarder) shared(req *http.Request, key string, obtain func(*http.Request) (*sharedResponse, error)) (*sharedResponse, error) {
	if !f.coalesce {
		return obtain(req)
	}
	led := false // only the leader's function runs; the others wait for its answer
	v, err, _ := f.flights.Do(key, func() (any, error) {
		led = true
		// The first caller's cancellation must not fail the others.
		budget := time.Duration(f.retry.Attempts+1) * f.bodyTimeout
		detached, cancel := context.WithTimeout(context.WithoutCancel(req.Context()), budget)
		defer cancel()
		return obtain(req.WithContext(detached)) // send clones it before changing anything
	})
	if !led {
		f.metrics.cache.WithLabelValues("coalesced").Inc()
	}
	if err != nil {
		return nil, err
	}
	return v.(*sharedResponse), nil
}

// obtain fetches req (with retries), caches a good answer, and stands a
// still-valid cached answer in for an upstream error.
func (f *forwarder) obtain(req *http.Request, key string, cacheable bool) (*sharedResponse, error) {
	if !cacheable {
		f.metrics.cache.WithLabelValues("uncached").Inc()
		return f.fetchRetrying(req)
	}
	f.metrics.cache.WithLabelValues("miss").Inc()
	resp, err := f.fetchRetrying(req)
	if err == nil && !resp.unavailable && !retryable(resp.status) {
		f.cache.store(key, req.URL.Path, resp)
		return resp, nil
	}
	if stale := f.cache.stale(key); stale != nil {
		f.metrics.cache.WithLabelValues("stale").Inc()
		return stale, nil
	}
	return resp, err
}

// fetch forwards req according to the session state. An upstream 401 to a
// request that carried the session token means the token went stale: the
// session is refreshed once (shared with concurrent callers) and the request
// retried once. unavailable reports an answer of the proxy's own making (503
// without a session, 502 when even a fresh token is refused), which is
// neither retried nor cached.
func (f *forwarder) fetch(req *http.Request) (resp *http.Response, unavailable bool, err error) {
	state, tok, err := f.session.current(req.Context())
	if err != nil {
		return nil, false, err
	}
	if state == stateDown {
		return f.unavailable(req), true, nil
	}
	resp, err = f.send(req, tok)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, false, err
	}
	discard(resp)
	if state == stateV1Fallback {
		// The upstream requires tokens and the proxy has none: a 401 would
		// only make the client fetch another proxy token and fail again.
		return f.unavailable(req), true, nil
	}
	if state, tok = f.session.refresh(tok); state != stateV2 {
		return f.unavailable(req), true, nil
	}
	if resp, err = f.send(req, tok); err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, false, err
	}
	// A fresh token refused too: passing the 401 on would tell the client
	// its own (valid) token is bad, and the SDK would only fetch another.
	discard(resp)
	return textResponse(req, http.StatusBadGateway, "imds-proxy: the upstream refused the proxy's session token"), true, nil
}

// sharedResponse is an upstream answer read whole, to hand to every
// coalesced caller.
type sharedResponse struct {
	status      int
	header      http.Header
	body        []byte
	unavailable bool
}

var errTooLarge = errors.New("upstream response larger than 1 MiB")

func readShared(resp *http.Response, unavailable bool) (*sharedResponse, error) {
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxSharedBody+1))
	if err != nil {
		return nil, err
	}
	if len(body) > maxSharedBody {
		return nil, errTooLarge
	}
	return &sharedResponse{status: resp.StatusCode, header: resp.Header, body: body, unavailable: unavailable}, nil
}

func (s *sharedResponse) response(req *http.Request) *http.Response {
	return &http.Response{
		Status: http.StatusText(s.status), StatusCode: s.status,
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: s.header.Clone(), Body: io.NopCloser(bytes.NewReader(s.body)),
		ContentLength: int64(len(s.body)), Request: req,
	}
}

func markUnavailable(ctx *goproxy.ProxyCtx, unavailable bool) {
	if x, ok := ctx.UserData.(*exchange); ok && unavailable {
		x.outcome = outcomeUpstreamUnavailable
	}
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

func (f *forwarder) unavailable(req *http.Request) *http.Response {
	resp := textResponse(req, http.StatusServiceUnavailable,
		"imds-proxy has no IMDSv2 session with the upstream IMDS (see the proxy's log and "+
			"imds_proxy_upstream_session_state); the usual cause is the instance's metadata hop limit")
	resp.Header.Set("Retry-After", "1")
	return resp
}

// discard drains a little of an unwanted body so the connection can be
// reused, and closes it.
func discard(resp *http.Response) {
	_, _ = io.CopyN(io.Discard, resp.Body, 4096)
	resp.Body.Close()
}
