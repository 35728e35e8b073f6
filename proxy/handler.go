package proxy

import (
	"errors"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/elazarl/goproxy"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/token"
)

// exchange is what the proxy learns about one client request on its way
// through the handlers; goproxy carries it in ProxyCtx.UserData.
type exchange struct {
	start   time.Time
	caller  netip.Addr
	version string // "v1" (no token) or "v2"
	outcome string
	ttl     int // seconds a token request asked for: a client fingerprint (SDKs differ)
}

func newExchange(r *http.Request) *exchange {
	x := &exchange{start: time.Now(), version: "v2"}
	if r.URL.Path != tokenPath && len(r.Header.Values(token.Header)) == 0 {
		x.version = "v1"
	}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		x.caller = ap.Addr().Unmap()
	}
	return x
}

// handleRequest decides each request: the proxy answers token requests and
// refusals itself, and hands the rest to the forwarder.
func (p *Proxy) handleRequest(r *http.Request, ctx *goproxy.ProxyCtx) (*http.Request, *http.Response) {
	x := newExchange(r)
	ctx.UserData = x
	if r.URL.Host != p.cfg.Upstream.Host { // defence in depth: ServeHTTP already pinned it
		x.outcome = outcomeNotAProxy
		return r, textResponse(r, http.StatusForbidden, "not a forward proxy")
	}
	if r.URL.Path == tokenPath {
		return r, p.serveToken(r, x)
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		x.outcome = outcomeMethodNotAllowed
		resp := textResponse(r, http.StatusMethodNotAllowed, "method not allowed")
		resp.Header.Set("Allow", "GET, HEAD")
		return r, resp
	}
	if resp := p.authorize(r, x); resp != nil {
		return r, resp
	}
	if resp := p.checkPath(r, x); resp != nil {
		return r, resp
	}
	removeHopByHop(r.Header)
	removeForwarding(r.Header)
	r.Header.Del(token.Header)
	r.Header.Del(token.TTLHeader)
	r.Body, r.ContentLength = http.NoBody, 0 // IMDS reads no body; this also makes retries safe
	ctx.RoundTripper = p.fwd
	return r, nil
}

// authorize checks the client's token, or applies the IMDSv1 policy when
// there is none. It returns the refusal, or nil to go on.
func (p *Proxy) authorize(r *http.Request, x *exchange) *http.Response {
	tokens := r.Header.Values(token.Header)
	switch len(tokens) {
	case 0:
		proc, attributed := p.attribute(r)
		msg := "IMDSv1 request (no token)"
		if p.cfg.V1 == V1Warn {
			msg = "IMDSv1 request (no token): --v1 block would refuse it"
		}
		p.log.Warn(msg, zap.String("method", r.Method), zap.String("path", r.URL.Path),
			zap.String("user_agent", r.UserAgent()), zap.String("caller", x.caller.String()),
			zap.String("policy", string(p.cfg.V1)), zap.Intp("uid", proc.UID), zap.Int("pid", proc.PID),
			zap.String("command", proc.Command), zap.String("executable", proc.Executable))
		p.metrics.v1BySDK.WithLabelValues(sdkFamily(r.UserAgent())).Inc()
		if attributed {
			p.callers.record(x.caller.String(), r.UserAgent(), r.URL.Path, proc, x.start)
		} else {
			p.callers.recordUnattributed(x.caller.String(), r.UserAgent(), r.URL.Path, x.start)
		}
		if p.cfg.V1 == V1Block {
			x.outcome = outcomeV1Blocked
			return unauthorized(r)
		}
		p.metrics.v1WouldBlock.Inc()
		return nil
	case 1:
		if err := p.minter.Verify(tokens[0], x.caller); err != nil {
			x.outcome = outcomeUnauthorized
			p.log.Debug("token rejected", zap.String("reason", err.Error()), zap.String("caller", x.caller.String()))
			return unauthorized(r)
		}
		return nil
	}
	x.outcome = outcomeBadRequest
	return textResponse(r, http.StatusBadRequest, "more than one token header")
}

// attribute finds the process behind an IMDSv1 request where the shape lets
// the proxy see it. attributed is false when the lookup was skipped, over
// its rate bound.
func (p *Proxy) attribute(r *http.Request) (proc Process, attributed bool) {
	client, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return Process{}, true
	}
	if !p.attributions.Allow() {
		p.metrics.attributionsSkipped.Inc()
		return Process{}, false
	}
	return p.attributor.lookup(client), true
}

// checkPath normalises the request path, applies the path policy, and
// forwards the normalised path, so what was checked is what is sent.
func (p *Proxy) checkPath(r *http.Request, x *exchange) *http.Response {
	clean, err := NormalisePath(r.URL.EscapedPath())
	if err != nil {
		x.outcome = outcomeBadRequest
		return textResponse(r, http.StatusBadRequest, "bad request")
	}
	if !p.cfg.Paths.Allows(clean) {
		x.outcome = outcomePathDenied
		p.log.Info("path denied by policy", zap.String("path", clean), zap.String("caller", x.caller.String()),
			zap.String("user_agent", r.UserAgent()))
		return textResponse(r, http.StatusForbidden, "forbidden by imds-proxy path policy")
	}
	// IMDS takes no query string: dropping it means what was checked (and
	// what the cache keys on) is exactly what the upstream is sent.
	r.URL.Path, r.URL.RawPath, r.URL.RawQuery, r.URL.ForceQuery = clean, "", "", false
	return nil
}

// serveToken answers PUT /latest/api/token the way IMDS does.
func (p *Proxy) serveToken(r *http.Request, x *exchange) *http.Response {
	x.outcome = outcomeTokenRefused
	if r.Method != http.MethodPut {
		resp := textResponse(r, http.StatusMethodNotAllowed, "method not allowed")
		resp.Header.Set("Allow", "PUT")
		return resp
	}
	if len(r.Header.Values("X-Forwarded-For")) > 0 {
		return textResponse(r, http.StatusForbidden, "forbidden")
	}
	ttl, err := token.ParseTTL(r.Header.Values(token.TTLHeader))
	if err != nil {
		return textResponse(r, http.StatusBadRequest, "bad request: "+err.Error())
	}
	if !x.caller.IsValid() {
		p.log.Error("cannot bind token to caller: unparseable remote address", zap.String("remote_addr", r.RemoteAddr))
		return textResponse(r, http.StatusInternalServerError, "internal error")
	}
	tok, _, err := p.minter.Mint(x.caller, ttl)
	if err != nil {
		return textResponse(r, http.StatusBadRequest, "bad request")
	}
	x.outcome = outcomeTokenIssued
	x.ttl = int(ttl.Seconds())
	p.metrics.tokensMinted.Inc()
	resp := textResponse(r, http.StatusOK, tok)
	resp.Header.Set(token.TTLHeader, strconv.Itoa(int(ttl.Seconds())))
	return resp
}

// handleResponse turns transport errors into short 502/504 answers with no
// internal detail, strips hop-by-hop headers, and records the exchange.
func (p *Proxy) handleResponse(resp *http.Response, ctx *goproxy.ProxyCtx) *http.Response {
	x, _ := ctx.UserData.(*exchange)
	if x == nil {
		x = newExchange(ctx.Req)
	}
	if resp == nil {
		resp = p.upstreamFailure(ctx, x)
	} else if x.outcome == "" {
		x.outcome = outcomeForwarded
		removeHopByHop(resp.Header)
	}
	// Every answer names the proxy (doctor looks for it on token answers), so
	// that a proxy chained in front of this one knows its answers come from
	// an imds-proxy, which has already retried what it could.
	resp.Header.Set(proxyHeader, p.shapeName())
	p.record(x, ctx.Req, resp.StatusCode)
	return resp
}

func (p *Proxy) shapeName() string {
	if p.cfg.Shape == "" {
		return "imds-proxy"
	}
	return p.cfg.Shape
}

func (p *Proxy) upstreamFailure(ctx *goproxy.ProxyCtx, x *exchange) *http.Response {
	err := ctx.Error
	var netErr net.Error
	status, outcome := http.StatusBadGateway, outcomeUpstreamError
	if errors.As(err, &netErr) && netErr.Timeout() {
		status, outcome = http.StatusGatewayTimeout, outcomeUpstreamTimeout
	}
	x.outcome = outcome
	p.log.Warn("upstream request failed", zap.String("path", ctx.Req.URL.Path),
		zap.String("caller", x.caller.String()), zap.Int("status", status), zap.Error(err))
	return textResponse(ctx.Req, status, http.StatusText(status))
}

// record counts the exchange and logs it at debug.
func (p *Proxy) record(x *exchange, r *http.Request, status int) {
	p.metrics.requests.WithLabelValues(methodLabel(r.Method), x.outcome, x.version).Inc()
	if ce := p.log.Check(zap.DebugLevel, "request"); ce != nil {
		ce.Write(zap.String("method", r.Method), zap.String("path", r.URL.Path),
			zap.Int("status", status), zap.String("outcome", x.outcome),
			zap.String("imds_version", x.version), zap.String("caller", x.caller.String()),
			zap.String("user_agent", r.UserAgent()), zap.Int("token_ttl", x.ttl), zap.Duration("duration", time.Since(x.start)))
	}
}

func unauthorized(r *http.Request) *http.Response {
	return textResponse(r, http.StatusUnauthorized, "unauthorized")
}

func textResponse(r *http.Request, status int, body string) *http.Response {
	resp := goproxy.NewResponse(r, goproxy.ContentTypeText, status, body)
	resp.Header.Set("Server", serverName)
	return resp
}
