package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/elazarl/goproxy"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
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
	if r.URL.Path != imdsapi.TokenPath && len(r.Header.Values(imdsapi.TokenHeader)) == 0 {
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
		return r, imdsError(r, http.StatusForbidden)
	}
	if r.URL.Path == imdsapi.TokenPath {
		return r, p.serveToken(r, x)
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		x.outcome = outcomeMethodNotAllowed
		resp := imdsError(r, http.StatusMethodNotAllowed)
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
	r.Header.Del(imdsapi.TokenHeader)
	r.Header.Del(imdsapi.TokenTTLHeader)
	r.Body, r.ContentLength = http.NoBody, 0 // IMDS reads no body; this also makes retries safe
	ctx.RoundTripper = p.fwd
	return r, nil
}

// authorize checks the client's token, or applies the IMDSv1 policy when
// there is none. It returns the refusal, or nil to go on.
func (p *Proxy) authorize(r *http.Request, x *exchange) *http.Response {
	tokens := r.Header.Values(imdsapi.TokenHeader)
	switch len(tokens) {
	case 0:
		if r.Header.Get(imdsapi.ProbeHeader) != "" {
			return p.answerProbe(r, x)
		}
		policy := p.v1Policy(r.Context())
		proc, attributed := p.attribute(r)
		if attributed {
			p.callers.record(x.caller.String(), r.UserAgent(), r.URL.Path, proc, x.start)
		} else {
			proc = p.callers.recordUnattributed(x.caller.String(), r.UserAgent(), r.URL.Path, x.start)
		}
		p.logV1(r, x, proc, policy)
		p.metrics.v1BySDK.WithLabelValues(sdkFamily(r.UserAgent())).Inc()
		// Counted under every policy: it is the number operators watch fall
		// to zero before they require tokens, whatever this proxy does now.
		p.metrics.v1WouldBlock.Inc()
		if policy == imdsapi.V1Block {
			x.outcome = outcomeV1Blocked
			return imdsError(r, http.StatusUnauthorized)
		}
		return nil
	case 1:
		if err := p.minter.Verify(tokens[0], x.caller); err != nil {
			x.outcome = outcomeUnauthorized
			p.log.Debug("token rejected", zap.String("reason", err.Error()), zap.String("caller", x.caller.String()))
			return imdsError(r, http.StatusUnauthorized)
		}
		return nil
	}
	x.outcome = outcomeBadRequest
	return imdsError(r, http.StatusBadRequest)
}

// logV1 logs a tokenless request within the per-caller log limit: every
// field a client chose is truncated, and a flood from one caller costs a
// few lines and a summary, not a line per request.
func (p *Proxy) logV1(r *http.Request, x *exchange, proc Process, policy imdsapi.V1Policy) {
	key := logKey{kind: logKindV1, caller: x.caller.String(), uid: uidOf(proc)}
	if !p.logs.allow(key, r.URL.Path, r.UserAgent()) {
		return
	}
	msg := "IMDSv1 request (no token)"
	if policy == imdsapi.V1Warn {
		msg = "IMDSv1 request (no token): --v1 block would refuse it"
	}
	p.log.Warn(msg, zap.String("method", r.Method), zap.String("path", truncate(r.URL.Path)),
		zap.String("user_agent", truncate(r.UserAgent())), zap.String("caller", x.caller.String()),
		zap.String("policy", string(policy)), zap.String("configured_policy", string(p.cfg.V1)),
		zap.Intp("uid", proc.UID), zap.Int("pid", proc.PID),
		zap.String("command", proc.Command), zap.String("executable", proc.Executable))
}

// v1Policy is the IMDSv1 policy in force now: the configured one, or for
// auto, block while the upstream refuses tokenless requests or nobody knows
// yet whether it does, and allow once it is known to serve them.
func (p *Proxy) v1Policy(ctx context.Context) imdsapi.V1Policy {
	if p.cfg.V1 != imdsapi.V1Auto {
		return p.cfg.V1
	}
	// A request that arrives before the first probe has answered waits for
	// it, rather than being refused for want of an answer.
	p.session.waitDecided(ctx)
	return effectiveV1(p.cfg.V1, p.session.v1State())
}

func effectiveV1(configured imdsapi.V1Policy, upstream upstreamV1) imdsapi.V1Policy {
	switch {
	case configured != imdsapi.V1Auto:
		return configured
	case upstream == upstreamV1Served:
		return imdsapi.V1Allow
	}
	return imdsapi.V1Block
}

// answerProbe answers a chained imds-proxy's probe (see imdsapi.ProbeHeader) with
// this proxy's own policy: 401 where it refuses tokenless requests, an
// empty 200 where it serves them. Nothing is forwarded, logged at info or
// entered in /v1-callers: the probe is not an IMDSv1 caller.
func (p *Proxy) answerProbe(r *http.Request, x *exchange) *http.Response {
	x.outcome = outcomeV1Probe
	if p.v1Policy(r.Context()) == imdsapi.V1Block {
		return imdsError(r, http.StatusUnauthorized)
	}
	return textResponse(r, http.StatusOK, "")
}

// v1StateChanged reports what the upstream's IMDSv1 policy, as probed,
// means here: in imds_proxy_v1_policy, and in the log when it changed or
// the first probe could not tell (err says why).
func (p *Proxy) v1StateChanged(prev, next upstreamV1, err error) {
	p.metrics.setV1Policy(p.cfg.V1, effectiveV1(p.cfg.V1, next))
	if prev == next && next != upstreamV1Unknown {
		return
	}
	fields := []zap.Field{zap.String("configured_policy", string(p.cfg.V1)),
		zap.String("policy", string(effectiveV1(p.cfg.V1, next))), zap.Stringer("upstream_v1", next)}
	if err != nil {
		fields = append(fields, zap.Error(err))
	}
	switch {
	case p.cfg.V1 == imdsapi.V1Auto && next == upstreamV1Refused:
		p.log.Info("the upstream refuses tokenless (IMDSv1) requests: --v1 auto refuses them here too", fields...)
	case p.cfg.V1 == imdsapi.V1Auto && next == upstreamV1Served:
		p.log.Info("the upstream serves tokenless (IMDSv1) requests: --v1 auto serves them here too", fields...)
	case p.cfg.V1 == imdsapi.V1Auto:
		p.log.Warn("cannot tell whether the upstream serves tokenless (IMDSv1) requests: "+
			"--v1 auto refuses them until it can", fields...)
	case next == upstreamV1Refused && (p.cfg.V1 == imdsapi.V1Allow || p.cfg.V1 == imdsapi.V1Warn):
		p.log.Warn("--v1 "+string(p.cfg.V1)+" re-opens IMDSv1, which the upstream refuses (tokens are required there): "+
			"a tokenless request, such as a container's SSRF, gets metadata and role credentials through this proxy's "+
			"own token; use --v1 auto (the default) or block unless callers still need IMDSv1 during a migration", fields...)
	}
}

// attribute finds the process behind an IMDSv1 request where the mode lets
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
		return imdsError(r, http.StatusBadRequest)
	}
	if !p.cfg.Paths.Allows(clean) {
		x.outcome = outcomePathDenied
		if p.logs.allow(logKey{kind: logKindPathDenied, caller: x.caller.String(), uid: -1}, clean, r.UserAgent()) {
			p.log.Info("path denied by policy", zap.String("path", truncate(clean)), zap.String("caller", x.caller.String()),
				zap.String("user_agent", truncate(r.UserAgent())))
		}
		return imdsError(r, http.StatusForbidden)
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
		resp := imdsError(r, http.StatusMethodNotAllowed)
		resp.Header.Set("Allow", "PUT")
		return resp
	}
	if len(r.Header.Values("X-Forwarded-For")) > 0 {
		// IMDS refuses token requests with a 403 and no body at all
		// (aws-beam/aws_credentials#47 quotes one), unlike its other errors.
		return textResponse(r, http.StatusForbidden, "")
	}
	ttl, err := token.ParseTTL(r.Header.Values(imdsapi.TokenTTLHeader))
	if err != nil {
		return imdsError(r, http.StatusBadRequest)
	}
	if !x.caller.IsValid() {
		p.log.Error("cannot bind token to caller: unparseable remote address", zap.String("remote_addr", r.RemoteAddr))
		return textResponse(r, http.StatusInternalServerError, "internal error")
	}
	tok, _, err := p.minter.Mint(x.caller, ttl)
	if err != nil {
		return imdsError(r, http.StatusBadRequest)
	}
	x.outcome = outcomeTokenIssued
	x.ttl = int(ttl.Seconds())
	p.metrics.tokensMinted.Inc()
	resp := textResponse(r, http.StatusOK, tok)
	resp.Header.Set(imdsapi.TokenTTLHeader, strconv.Itoa(int(ttl.Seconds())))
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
	resp.Header.Set(imdsapi.ProxyHeader, p.modeName())
	p.record(x, ctx.Req, resp.StatusCode)
	return resp
}

func (p *Proxy) modeName() string {
	if p.cfg.Mode == "" {
		return "imds-proxy"
	}
	return string(p.cfg.Mode)
}

func (p *Proxy) upstreamFailure(ctx *goproxy.ProxyCtx, x *exchange) *http.Response {
	err := ctx.Error
	var netErr net.Error
	status, outcome := http.StatusBadGateway, outcomeUpstreamError
	if errors.As(err, &netErr) && netErr.Timeout() {
		status, outcome = http.StatusGatewayTimeout, outcomeUpstreamTimeout
	}
	x.outcome = outcome
	p.log.Warn("upstream request failed", zap.String("path", truncate(ctx.Req.URL.Path)),
		zap.String("caller", x.caller.String()), zap.Int("status", status), zap.Error(err))
	return textResponse(ctx.Req, status, http.StatusText(status))
}

// record counts the exchange and logs it at debug.
func (p *Proxy) record(x *exchange, r *http.Request, status int) {
	p.metrics.requests.WithLabelValues(methodLabel(r.Method), x.outcome, x.version).Inc()
	if ce := p.log.Check(zap.DebugLevel, "request"); ce != nil {
		ce.Write(zap.String("method", truncate(r.Method)), zap.String("path", truncate(r.URL.Path)),
			zap.Int("status", status), zap.String("outcome", x.outcome),
			zap.String("imds_version", x.version), zap.String("caller", x.caller.String()),
			zap.String("user_agent", truncate(r.UserAgent())), zap.Int("token_ttl", x.ttl), zap.Duration("duration", time.Since(x.start)))
	}
}

// imdsErrorType is the Content-Type of IMDS's error pages.
const imdsErrorType = "text/html"

// imdsErrorPage is the body IMDS sends with an error status: an XHTML page
// titled "<code> - <reason>", as the AWS SDK for Go's tests quote its 404
// (aws/aws-sdk-go, aws/ec2metadata/api_test.go) and SDKs print it.
func imdsErrorPage(status int) string {
	title := strconv.Itoa(status) + " - " + http.StatusText(status)
	return `<?xml version="1.0" encoding="iso-8859-1"?>
<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"
         "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">
 <head>
  <title>` + title + `</title>
 </head>
 <body>
  <h1>` + title + `</h1>
 </body>
</html>`
}

// imdsError answers status as IMDS does, with its error page.
func imdsError(r *http.Request, status int) *http.Response {
	resp := goproxy.NewResponse(r, imdsErrorType, status, imdsErrorPage(status))
	resp.Header.Set("Server", imdsapi.ServerName)
	return resp
}

func textResponse(r *http.Request, status int, body string) *http.Response {
	resp := goproxy.NewResponse(r, goproxy.ContentTypeText, status, body)
	resp.Header.Set("Server", imdsapi.ServerName)
	return resp
}
