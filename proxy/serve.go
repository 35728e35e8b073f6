package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/elazarl/goproxy"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/token"
	"github.com/imds-proxy/imds-proxy/workload"
)

// How one client request is served. ServeHTTP marks the connection as
// used, asks decide, and either writes the proxy's own answer or hands the
// request to goproxy, whose transport is the forwarder (forward.go).
// decide applies the README's rules ("How it behaves") in this order, and
// the first rule that answers decides:
//
//	1. limits          a connection past the limits 503; headers too large 431; a body 413
//	2. not a proxy     CONNECT or an absolute URI 403
//	3. loop            the proxy's own upstream request, come back to it, 508
//	4. token endpoint  PUT /latest/api/token mints a token; other methods 405,
//	                   X-Forwarded-For 403, a bad TTL 400
//	5. method          anything but GET and HEAD 405
//	6. token or v1     one valid token goes on (else 401; two tokens 400); without
//	                   one, a chained proxy's probe is answered with the IMDSv1
//	                   policy, and the policy applies (block: 401); the policy
//	                   is the caller's workload's own, raised to the floor, or
//	                   the configured one
//	7. path policy     a path that cannot be normalised 400; a denied path 403;
//	                   the node role's credentials, to a workload with an
//	                   identity of its own, 404 (GuardOwnIdentity); the role
//	                   path, from the workload's own role (WorkloadRole)
//	8. forward         the normalised path, with the proxy's own headers only
//	                   (a tokenless request as it came, with V1Tokenless)
//
// Bookkeeping (metrics, the log, /v1-callers) follows the decision, in
// ServeHTTP: deciding has no side effects beyond reading the request.
// Every answer the proxy makes itself is an ownAnswer, written with the same
// headers wherever it is made.

// ServeHTTP serves one client request.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	markServed(r)
	x := newExchange(r)
	x.who = p.cfg.Workloads.Of(x.client)
	x.workload = x.who.Workload
	v := p.decide(r, x.caller, p.workloadFor(x))
	if v.v1 {
		p.noteV1(r, x, v.policy)
	}
	if v.answer == nil {
		p.forward(w, r, x, v.path, v.v1 && p.cfg.V1Tokenless)
		return
	}
	p.noteRefusal(r, x, v)
	p.writeOwn(w, r, x, v.answer)
}

// verdict is what decide concluded about one request.
type verdict struct {
	// answer is the proxy's own answer, or nil to forward the request.
	answer *ownAnswer
	// path is the normalised path to forward.
	path string
	// v1 says the request is an IMDSv1 caller's (tokenless, not a probe),
	// and policy is the IMDSv1 policy that was applied to it.
	v1     bool
	policy imdsapi.V1Policy
}

// decide applies the rules above to r from caller, whose workload the
// rules that depend on it ask workloadOf for. It reads the request (and
// discards any body); its only other effects are log lines about a token
// that is refused or cannot be bound, or a workload setting that is no
// policy, the scan of /proc that workloadOf may make, and asking the
// workload role's source when its credentials are due.
func (p *Proxy) decide(r *http.Request, caller netip.Addr, workloadOf func() workload.Workload) verdict {
	if a := p.checkLimits(r); a != nil {
		return verdict{answer: a}
	}
	if r.Method == http.MethodConnect || r.URL.IsAbs() || r.URL.Host != "" {
		return verdict{answer: imdsRefusal(http.StatusForbidden, outcomeNotAProxy)}
	}
	if r.Header.Get(imdsapi.LoopHeader) == p.id {
		return verdict{answer: plainAnswer(http.StatusLoopDetected, outcomeLoop, http.StatusText(http.StatusLoopDetected))}
	}
	if r.URL.Path == imdsapi.TokenPath {
		return verdict{answer: p.tokenAnswer(r, caller)}
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return verdict{answer: imdsRefusal(http.StatusMethodNotAllowed, outcomeMethodNotAllowed).with("Allow", "GET, HEAD")}
	}
	var v verdict
	switch tokens := r.Header.Values(imdsapi.TokenHeader); {
	case len(tokens) > 1:
		return verdict{answer: imdsRefusal(http.StatusBadRequest, outcomeBadRequest)}
	case len(tokens) == 1:
		if err := p.minter.Verify(tokens[0], caller); err != nil {
			p.log.Debug("token rejected", zap.String("reason", err.Error()), zap.String("caller", caller.String()))
			return verdict{answer: imdsRefusal(http.StatusUnauthorized, outcomeUnauthorized)}
		}
	case r.Header.Get(imdsapi.ProbeHeader) != "":
		return verdict{answer: p.probeAnswer(r.Context(), workloadOf())}
	default:
		v.v1, v.policy = true, p.v1Policy(r.Context(), workloadOf())
		if v.policy == imdsapi.V1Block {
			v.answer = imdsRefusal(http.StatusUnauthorized, outcomeV1Blocked)
			return v
		}
	}
	clean, err := NormalisePath(r.URL.EscapedPath())
	if err != nil {
		v.answer = imdsRefusal(http.StatusBadRequest, outcomeBadRequest)
		return v
	}
	v.path = clean
	switch {
	case !p.cfg.Paths.Allows(clean):
		v.answer = imdsRefusal(http.StatusForbidden, outcomePathDenied)
	case p.cfg.GuardOwnIdentity && roleCredentialsPath(clean) && workloadOf().OwnIdentity != "":
		v.answer = imdsRefusal(http.StatusNotFound, outcomeIdentityGuarded)
	case p.role != nil:
		if below, ok := workloadRolePath(clean); ok {
			v.answer = p.role.answer(r.Context(), below)
		}
	}
	return v
}

// workloadFor is the workload of x's caller for the rules that depend on
// it: what Of knew, or else what a trace of the connection finds now.
// Requests that no such rule decides (IMDSv2, mostly) never wait on a scan.
func (p *Proxy) workloadFor(x *exchange) func() workload.Workload {
	return func() workload.Workload {
		if !x.workload.Known() {
			x.trace(p.cfg.Workloads)
			x.workload = x.who.Workload
		}
		return x.workload
	}
}

// checkLimits answers a request on a connection past the connection limits
// (503), or one beyond the header or body limit (431, 413), or returns nil.
// IMDS requests carry no body: any there is is read (up to the limit) here,
// inside the handler, so that net/http never finds it half read after.
func (p *Proxy) checkLimits(r *http.Request) *ownAnswer {
	if overConnectionLimit(r) {
		return plainAnswer(http.StatusServiceUnavailable, outcomeTooManyConnections, http.StatusText(http.StatusServiceUnavailable)).
			with("Connection", "close").with("Retry-After", "1")
	}
	if p.cfg.Limits.MaxHeaderBytes > 0 && headerBytes(r) > p.cfg.Limits.MaxHeaderBytes {
		return plainAnswer(http.StatusRequestHeaderFieldsTooLarge, outcomeHeaderTooLarge, http.StatusText(http.StatusRequestHeaderFieldsTooLarge))
	}
	if r.ContentLength == 0 {
		return nil
	}
	limit := p.cfg.Limits.MaxBodyBytes
	if limit <= 0 {
		limit = DefaultServerLimits().MaxBodyBytes
	}
	n, _ := io.CopyN(io.Discard, r.Body, limit+1)
	if n <= limit && r.ContentLength <= limit {
		return nil
	}
	// The rest of the body is not read, so the connection cannot carry another request.
	return plainAnswer(http.StatusRequestEntityTooLarge, outcomeBodyTooLarge, http.StatusText(http.StatusRequestEntityTooLarge)).
		with("Connection", "close")
}

// tokenAnswer answers PUT /latest/api/token the way IMDS does, with a token
// of the proxy's own bound to caller.
func (p *Proxy) tokenAnswer(r *http.Request, caller netip.Addr) *ownAnswer {
	if r.Method != http.MethodPut {
		return imdsRefusal(http.StatusMethodNotAllowed, outcomeTokenRefused).with("Allow", "PUT")
	}
	if len(r.Header.Values("X-Forwarded-For")) > 0 {
		// IMDS refuses token requests with a 403 and no body at all
		// (the README cites one), unlike its other errors.
		return plainAnswer(http.StatusForbidden, outcomeTokenRefused, "")
	}
	ttl, err := token.ParseTTL(r.Header.Values(imdsapi.TokenTTLHeader))
	if err != nil {
		return imdsRefusal(http.StatusBadRequest, outcomeTokenRefused)
	}
	if !caller.IsValid() {
		p.log.Error("cannot bind token to caller: unparseable remote address", zap.String("remote_addr", r.RemoteAddr))
		return plainAnswer(http.StatusInternalServerError, outcomeTokenRefused, "internal error")
	}
	tok, _, err := p.minter.Mint(caller, ttl)
	if err != nil {
		return imdsRefusal(http.StatusBadRequest, outcomeTokenRefused)
	}
	a := plainAnswer(http.StatusOK, outcomeTokenIssued, tok).with(imdsapi.TokenTTLHeader, strconv.Itoa(int(ttl.Seconds())))
	a.tokenTTL = int(ttl.Seconds())
	return a
}

// probeAnswer answers a chained imds-proxy's probe (see
// imdsapi.ProbeHeader) with the policy for its workload w: 401 where it
// refuses tokenless requests, an empty 200 where it serves them. The probe
// is not an IMDSv1 caller: nothing is forwarded, logged or entered in
// /v1-callers.
func (p *Proxy) probeAnswer(ctx context.Context, w workload.Workload) *ownAnswer {
	if p.v1Policy(ctx, w) == imdsapi.V1Block {
		return imdsRefusal(http.StatusUnauthorized, outcomeV1Probe)
	}
	return plainAnswer(http.StatusOK, outcomeV1Probe, "")
}

// forward hands the request to goproxy, pointed at the upstream, with the
// normalised path and without the client's token, body and hop headers.
// The forwarder writes the upstream request's header itself
// (upstreamHeader); clearing these here keeps goproxy from acting on them.
// tokenless has the forwarder send it without the session token.
func (p *Proxy) forward(w http.ResponseWriter, r *http.Request, x *exchange, path string, tokenless bool) {
	removeHopByHop(r.Header)
	removeForwarding(r.Header)
	r.Header.Del(imdsapi.LoopHeader) // a downstream proxy's id is not for the upstream
	r.Header.Del(imdsapi.TokenHeader)
	r.Header.Del(imdsapi.TokenTTLHeader)
	r.Body, r.ContentLength = http.NoBody, 0 // IMDS reads no body; this also makes retries safe
	// IMDS takes no query string: dropping it means what was checked (and
	// what the cache keys on) is exactly what the upstream is sent.
	r.URL.Path, r.URL.RawPath, r.URL.RawQuery, r.URL.ForceQuery = path, "", "", false
	r.URL.Scheme, r.URL.Host, r.Host = p.cfg.Upstream.Scheme, p.cfg.Upstream.Host, p.cfg.Upstream.Host
	ctx := context.WithValue(r.Context(), exchangeKey{}, x)
	if tokenless {
		ctx = context.WithValue(ctx, tokenlessKey{}, true)
	}
	p.engine.ServeHTTP(w, r.WithContext(ctx))
}

// newEngine configures goproxy for requests that decide forwards: the
// forwarder is their transport, and finishResponse turns its answers into
// the client's.
func (p *Proxy) newEngine() *goproxy.ProxyHttpServer {
	engine := goproxy.NewProxyHttpServer()
	engine.Logger = zapPrintf{p.log}
	engine.Tr = nil // never used: every request gets the forwarder as its RoundTripper
	engine.ConnectDial = nil
	engine.KeepAcceptEncoding = true
	engine.NonproxyHandler = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "imds-proxy: internal routing error", http.StatusInternalServerError)
	})
	transport := goproxy.RoundTripperFunc(func(r *http.Request, _ *goproxy.ProxyCtx) (*http.Response, error) {
		return p.fwd.RoundTrip(r)
	})
	engine.OnRequest().DoFunc(func(r *http.Request, ctx *goproxy.ProxyCtx) (*http.Request, *http.Response) {
		ctx.UserData = r.Context().Value(exchangeKey{})
		ctx.RoundTripper = transport
		return r, nil
	})
	engine.OnResponse().DoFunc(p.finishResponse)
	return engine
}

// finishResponse turns the forwarder's result into the client's answer:
// the upstream's answer less its hop-by-hop headers, or an answer of the
// proxy's own (the forwarder's, or 502/504 for a failed upstream request),
// and records the exchange.
func (p *Proxy) finishResponse(resp *http.Response, ctx *goproxy.ProxyCtx) *http.Response {
	x, _ := ctx.UserData.(*exchange)
	if x == nil {
		x = newExchange(ctx.Req)
	}
	if resp == nil {
		a := p.failedUpstream(ctx.Req, x, ctx.Error)
		x.outcome = a.outcome
		resp = a.response(ctx.Req, p.modeName())
	} else {
		x.outcome = outcomeForwarded
		removeHopByHop(resp.Header)
		// Every answer names the proxy, so that a proxy chained in front of
		// this one knows an imds-proxy has retried it already.
		resp.Header.Set(imdsapi.ProxyHeader, p.modeName())
	}
	p.record(x, ctx.Req, resp.StatusCode)
	return resp
}

// failedUpstream is the answer to a request the forwarder could not answer
// from the upstream: its own answer if it made one, else 504 for a timeout
// and 502 for any other failure, with no internal detail.
func (p *Proxy) failedUpstream(r *http.Request, x *exchange, err error) *ownAnswer {
	var own *ownAnswer
	if errors.As(err, &own) {
		return own
	}
	var netErr net.Error
	status, outcome := http.StatusBadGateway, outcomeUpstreamError
	if errors.As(err, &netErr) && netErr.Timeout() {
		status, outcome = http.StatusGatewayTimeout, outcomeUpstreamTimeout
	}
	p.log.Warn("upstream request failed", zap.String("path", truncate(r.URL.Path)),
		zap.String("caller", x.caller.String()), zap.Int("status", status), zap.Error(err))
	return plainAnswer(status, outcome, http.StatusText(status))
}

// noteRefusal logs the refusals an operator acts on: a loop (the exemption
// is wrong) and a denied path (within the per-caller log limit).
func (p *Proxy) noteRefusal(r *http.Request, x *exchange, v verdict) {
	switch v.answer.outcome {
	case outcomeLoop:
		p.log.Error("the proxy's own upstream request came back to it: the redirect exemption does not "+
			"match its traffic; check which exemption the rules use (imds-proxy doctor in the pod): the proxy's own "+
			"cgroup (--exempt-cgroup), --exempt-mark (needs NET_ADMIN or NET_RAW), or --exempt-uid against the UID it runs as",
			zap.String("path", truncate(r.URL.Path)))
	case outcomePathDenied:
		if p.logs.allow(logKey{kind: logKindPathDenied, caller: x.caller.String(), uid: -1}, v.path, r.UserAgent()) {
			p.log.Info("path denied by policy", zap.String("path", truncate(v.path)), zap.String("caller", x.caller.String()),
				zap.String("user_agent", truncate(r.UserAgent())))
		}
	case outcomeIdentityGuarded:
		if p.logs.allow(logKey{kind: logKindIdentityGuarded, caller: x.caller.String(), uid: -1}, v.path, r.UserAgent()) {
			p.log.Info("the node role's credentials refused: the workload has an AWS identity of its own",
				append(workloadFields(x.workload), zap.String("own_identity", x.workload.OwnIdentity),
					zap.String("path", truncate(v.path)), zap.String("caller", x.caller.String()))...)
		}
	}
}

// exchange is what the proxy knows about one client request, for its
// metrics and its debug log.
type exchange struct {
	start  time.Time
	client netip.AddrPort // the caller's end of the connection, unmapped
	caller netip.Addr
	// who is the caller's connection as a node agent traced it.
	who workload.Caller
	// traceTried says the connection was traced in this request, found or
	// not: one scan of /proc a request at most.
	traceTried bool
	// workload is the caller's workload: who's, or the one of the
	// process that made a tokenless request, where that is known better.
	workload workload.Workload
	version  string           // "v1" (no token) or "v2"
	sdk      string           // the client family of a tokenless request (sdkFamily)
	policy   imdsapi.V1Policy // the IMDSv1 policy applied to a tokenless request
	outcome  string
	ttl      int // seconds a token request asked for: a client fingerprint (SDKs differ)
}

// exchangeKey carries a forwarded request's exchange to goproxy's handlers.
type exchangeKey struct{}

// tokenlessKey marks a forwarded request to be sent without the session
// token (Config.V1Tokenless).
type tokenlessKey struct{}

func sentTokenless(ctx context.Context) bool { return ctx.Value(tokenlessKey{}) != nil }

// trace finds the caller's namespace and container, once a request, where
// Of did not know them.
func (x *exchange) trace(workloads *workload.Resolver) {
	if x.who.Traced || x.traceTried {
		return
	}
	x.traceTried = true
	x.who = workloads.Trace(x.client)
}

func newExchange(r *http.Request) *exchange {
	x := &exchange{start: time.Now(), version: "v2"}
	if r.URL.Path != imdsapi.TokenPath && len(r.Header.Values(imdsapi.TokenHeader)) == 0 {
		x.version, x.sdk = "v1", sdkFamily(r.UserAgent())
	}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		x.client = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		x.caller = x.client.Addr()
	}
	return x
}

// writeOwn writes an answer of the proxy's own and records the exchange.
func (p *Proxy) writeOwn(w http.ResponseWriter, r *http.Request, x *exchange, a *ownAnswer) {
	x.outcome, x.ttl = a.outcome, a.tokenTTL
	for name, values := range a.header(p.modeName()) {
		w.Header()[name] = values
	}
	w.WriteHeader(a.status)
	if r.Method != http.MethodHead {
		_, _ = io.WriteString(w, a.body)
	}
	p.record(x, r, a.status)
}

// record counts the exchange and logs it at debug.
func (p *Proxy) record(x *exchange, r *http.Request, status int) {
	p.metrics.requests.WithLabelValues(methodLabel(r.Method), x.outcome, x.version).Inc()
	if p.cfg.Workloads != nil && p.cfg.Mode == imdsapi.ModeNode {
		// A sidecar serves one workload, which its own series name.
		p.metrics.countWorkload(x.workload, x.version, x.policy, x.sdk)
	}
	if x.outcome == outcomeTokenIssued {
		p.metrics.tokensMinted.Inc()
	}
	if ce := p.log.Check(zap.DebugLevel, "request"); ce != nil {
		ce.Write(zap.String("method", truncate(r.Method)), zap.String("path", truncate(r.URL.Path)),
			zap.Int("status", status), zap.String("outcome", x.outcome),
			zap.String("imds_version", x.version), zap.String("caller", x.caller.String()),
			zap.String("user_agent", truncate(r.UserAgent())), zap.Int("token_ttl", x.ttl), zap.Duration("duration", time.Since(x.start)))
	}
}

func (p *Proxy) modeName() string {
	if p.cfg.Mode == "" {
		return "imds-proxy"
	}
	return string(p.cfg.Mode)
}

// ownAnswer is an answer the proxy makes itself rather than passing on the
// upstream's: a refusal by one of the rules, a token, a probe's answer, or
// the forwarder's word that the upstream cannot be asked. It is an error
// too, so that the forwarder's stages can return it where an upstream
// answer would be, and none of them mistakes it for one.
type ownAnswer struct {
	status   int
	outcome  string
	body     string
	page     bool        // IMDS's XHTML error page, not plain text
	extra    http.Header // Allow, Retry-After, Connection, the token's TTL
	tokenTTL int         // seconds, for a token
}

// imdsRefusal answers status as IMDS does, with its error page.
func imdsRefusal(status int, outcome string) *ownAnswer {
	return &ownAnswer{status: status, outcome: outcome, body: imdsErrorPage(status), page: true}
}

// plainAnswer answers status with body as plain text.
func plainAnswer(status int, outcome, body string) *ownAnswer {
	return &ownAnswer{status: status, outcome: outcome, body: body}
}

// with returns a with one more header.
func (a *ownAnswer) with(name, value string) *ownAnswer {
	if a.extra == nil {
		a.extra = http.Header{}
	}
	a.extra.Set(name, value)
	return a
}

func (a *ownAnswer) Error() string {
	return "imds-proxy answered " + strconv.Itoa(a.status) + " itself (" + a.outcome + ")"
}

// header is the whole header of the answer, the same set wherever it is
// made: IMDS's Server, the proxy's mode (so that a chained proxy does not
// retry it), the body's type and length, and the answer's own extras.
func (a *ownAnswer) header(mode string) http.Header {
	h := a.extra.Clone()
	if h == nil {
		h = http.Header{}
	}
	h.Set("Server", imdsapi.ServerName)
	h.Set(imdsapi.ProxyHeader, mode)
	h.Set("Content-Type", "text/plain")
	if a.page {
		h.Set("Content-Type", "text/html")
	}
	h.Set("Content-Length", strconv.Itoa(len(a.body)))
	return h
}

// response is the answer as goproxy passes responses on.
func (a *ownAnswer) response(r *http.Request, mode string) *http.Response {
	resp := goproxy.NewResponse(r, "", a.status, a.body)
	resp.Header = a.header(mode)
	return resp
}

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
