package proxy

import (
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/elazarl/goproxy"

	"github.com/imds-proxy/imds-proxy/token"
)

// forwarder sends client requests to the upstream with the proxy's own
// session token. It is the goproxy RoundTripper of every forwarded request.
type forwarder struct {
	id        string // loopHeader value
	upstream  *url.URL
	transport http.RoundTripper
	session   *session
	metrics   *metrics
}

// RoundTrip forwards req according to the session state. An upstream 401 to
// a request that carried the session token means the token went stale: the
// session is refreshed once (shared with concurrent callers) and the request
// retried once.
func (f *forwarder) RoundTrip(req *http.Request, ctx *goproxy.ProxyCtx) (*http.Response, error) {
	state, tok, err := f.session.current(req.Context())
	if err != nil {
		return nil, err
	}
	if state == stateDown {
		return f.unavailable(req, ctx), nil
	}
	resp, err := f.send(req, tok)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	discard(resp)
	if state == stateV1Fallback {
		// The upstream requires tokens and the proxy has none: a 401 would
		// only make the client fetch another proxy token and fail again.
		return f.unavailable(req, ctx), nil
	}
	if state, tok = f.session.refresh(tok); state != stateV2 {
		return f.unavailable(req, ctx), nil
	}
	return f.send(req, tok)
}

// send makes one upstream request, with the session token if there is one.
func (f *forwarder) send(req *http.Request, sessionToken string) (*http.Response, error) {
	out := req.Clone(req.Context())
	out.URL.Scheme, out.URL.Host, out.Host = f.upstream.Scheme, f.upstream.Host, f.upstream.Host
	out.Body = http.NoBody
	out.Header.Set(loopHeader, f.id)
	if sessionToken != "" {
		out.Header.Set(token.Header, sessionToken)
	}
	if out.Header.Get("User-Agent") == "" {
		out.Header.Set("User-Agent", "") // stop net/http adding its own
	}
	start := time.Now()
	resp, err := f.transport.RoundTrip(out)
	f.metrics.upstreamLatency.WithLabelValues("metadata").Observe(time.Since(start).Seconds())
	return resp, err
}

func (f *forwarder) unavailable(req *http.Request, ctx *goproxy.ProxyCtx) *http.Response {
	if x, ok := ctx.UserData.(*exchange); ok {
		x.outcome = outcomeUpstreamUnavailable
	}
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
