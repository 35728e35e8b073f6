package proxy_test

import (
	"bufio"
	"fmt"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// fuzzDeny is the path policy of FuzzServeHTTP: the two prefixes operators
// deny most.
var fuzzDeny = []string{"/latest/user-data", "/latest/meta-data/iam/"}

// Bits of FuzzServeHTTP's flags argument.
const (
	flagTokenModes  = 0x07 // tokenMode below, modulo 6
	flagTTL         = 0x08 // send the TTL header with the ttl argument
	flagTTLTwice    = 0x10 // and a second one
	flagForwarding  = 0x20 // send X-Forwarded-For, Forwarded and Via
	flagHopByHop    = 0x40 // send hop-by-hop headers
	flagConnNamesIt = 0x80 // send Connection: <extraName>
)

// Token headers FuzzServeHTTP sends, by flags&flagTokenModes%6.
const (
	tokNone       = iota // none: an IMDSv1 request
	tokArbitrary         // the tok argument
	tokValid             // a token the proxy minted for this caller
	tokValidTwice        // a valid token and the tok argument: two headers
	tokOtherCall         // a valid token of another caller
	tokValidJunk         // a valid token with the tok argument appended
)

var otherCaller = netip.MustParseAddr("10.9.9.9")

// FuzzServeHTTP sends requests built from the input (method, request target,
// Host, TTL and token header values, one extra header, and flags choosing
// which other headers are sent) through a real net/http server to two
// proxies in front of fake IMDSs, one with an IMDSv2 session and one in
// IMDSv1 fallback, and checks:
//   - the proxy never panics, and the status is exactly the one its decision
//     gives for the request as net/http parsed it (or net/http's own 400);
//   - a request is forwarded exactly when the decision says so, once, with
//     the upstream's answer passed back, and an answer of the proxy's own
//     reaches nothing upstream;
//   - the upstream sees only GET or HEAD, no body, its own address as Host,
//     the proxy's session token and no other (none in fallback), no TTL
//     header, no X-Forwarded-For, Forwarded, Via or hop-by-hop header,
//     nothing named in Connection, one proxy id; and a path that is the
//     client's path normalised, a fixed point of NormalisePath, and allowed
//     by the policy;
//   - a token the proxy answers verifies for the caller with the TTL it
//     states, and the proxy's own session token never reaches the client.
func FuzzServeHTTP(f *testing.F) {
	policy, err := proxy.NewPathPolicy(nil, fuzzDeny)
	if err != nil {
		f.Fatal(err)
	}
	fixtures := []*inProcess{newInProcess(f, policy, false, true), newInProcess(f, policy, true, true)}
	proxyIDs := make([]string, len(fixtures)) // each proxy's loop-detection id, learned from its first forwarded request

	f.Fuzz(func(t *testing.T, method, target, host, ttl, tok, extraName, extraValue string, flags uint8) {
		// Framing is net/http's business: one request per connection, no body.
		if strings.ContainsAny(method+target+host+ttl+tok+extraName+extraValue, "\r\n") || strings.Contains(extraName, ":") {
			return
		}
		switch strings.ToLower(strings.TrimSpace(extraName)) {
		case "content-length", "transfer-encoding", "expect":
			return
		}
		for i, ip := range fixtures {
			raw := buildRequest(ip, method, target, host, ttl, tok, extraName, extraValue, flags)
			checkExchange(t, ip, raw, method, flags, extraName, &proxyIDs[i])
		}
	})
}

// checkExchange sends raw to ip's proxy and checks the answer and what the
// upstream saw.
func checkExchange(t *testing.T, ip *inProcess, raw, method string, flags uint8, extraName string, proxyID *string) {
	t.Helper()
	caller := pipeCaller.Addr()
	ip.upstream.take()
	resp, body, err := ip.exchange(raw, method)
	if err != nil {
		t.Fatalf("%q: no response: %v", raw, err)
	}
	seen := ip.upstream.take()
	server := resp.Header.Get("Server")
	for name, values := range resp.Header {
		for _, v := range values {
			if strings.Contains(v, fakeSessionToken) {
				t.Fatalf("%q: the client got the proxy's upstream session token in %s", raw, name)
			}
		}
	}
	if strings.Contains(string(body), fakeSessionToken) {
		t.Fatalf("%q: the client got the proxy's upstream session token in the body", raw)
	}

	parsed, perr := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
	if server == "" { // answered by net/http itself
		switch {
		case len(seen) != 0:
			t.Fatalf("%q: net/http answered %d, yet the upstream saw %+v", raw, resp.StatusCode, seen)
		case resp.StatusCode == http.StatusOK && perr == nil && parsed.Method == "OPTIONS" && parsed.RequestURI == "*":
		case resp.StatusCode != http.StatusBadRequest:
			t.Fatalf("%q: status %d without a Server header, want net/http's 400", raw, resp.StatusCode)
		}
		return
	}
	if perr != nil {
		t.Fatalf("%q: http.ReadRequest refuses it (%v), yet the proxy answered %d", raw, perr, resp.StatusCode)
	}

	want, forward := expectedOutcome(ip, parsed, caller)
	if resp.StatusCode != want {
		t.Fatalf("%q (session token %q): status %d (Server %q, body %.80q), want %d", raw, ip.sessionToken, resp.StatusCode, server, body, want)
	}
	switch {
	case forward && (server != fakeServer || len(seen) != 1):
		t.Fatalf("%q: want it forwarded once, got Server %q and %d upstream requests", raw, server, len(seen))
	case forward && parsed.Method == http.MethodGet && string(body) != fakeBody:
		t.Fatalf("%q: body %q, want the upstream's %q", raw, body, fakeBody)
	case !forward && (server != "EC2ws" || len(seen) != 0):
		t.Fatalf("%q: want the proxy's own answer and nothing upstream, got Server %q and %+v", raw, server, seen)
	}
	for _, s := range seen {
		checkUpstreamRequest(t, ip, raw, parsed, s, flags, extraName, proxyID)
	}
	if parsed.URL.Path == "/latest/api/token" && resp.StatusCode == http.StatusOK {
		if err := ip.minter.Verify(string(body), caller); err != nil {
			t.Fatalf("%q: the token answered does not verify for the caller: %v", raw, err)
		}
		ttl, _ := token.ParseTTL(parsed.Header.Values(imdsapi.TokenTTLHeader))
		if got := resp.Header.Get(imdsapi.TokenTTLHeader); got != strconv.Itoa(int(ttl.Seconds())) {
			t.Fatalf("%q: %s answered %q, want %d", raw, imdsapi.TokenTTLHeader, got, int(ttl.Seconds()))
		}
	}
}

// buildRequest spells the request for ip (whose minter makes the valid tokens).
func buildRequest(ip *inProcess, method, target, host, ttl, tok, extraName, extraValue string, flags uint8) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\n", method, target, host)
	header := func(name, value string) { fmt.Fprintf(&b, "%s: %s\r\n", name, value) }
	mint := func(who netip.Addr) string {
		t, _, err := ip.minter.Mint(who, token.MaxTTL)
		if err != nil {
			panic(err)
		}
		return t
	}
	switch int(flags&flagTokenModes) % 6 {
	case tokArbitrary:
		header(imdsapi.TokenHeader, tok)
	case tokValid:
		header(imdsapi.TokenHeader, mint(pipeCaller.Addr()))
	case tokValidTwice:
		header(imdsapi.TokenHeader, mint(pipeCaller.Addr()))
		header(imdsapi.TokenHeader, tok)
	case tokOtherCall:
		header(imdsapi.TokenHeader, mint(otherCaller))
	case tokValidJunk:
		header(imdsapi.TokenHeader, mint(pipeCaller.Addr())+tok)
	}
	if flags&flagTTL != 0 {
		header(imdsapi.TokenTTLHeader, ttl)
		if flags&flagTTLTwice != 0 {
			header(imdsapi.TokenTTLHeader, ttl)
		}
	}
	if flags&flagForwarding != 0 {
		header("X-Forwarded-For", "10.9.8.7")
		header("Forwarded", "for=10.9.8.7")
		header("Via", "1.1 fuzz")
	}
	if flags&flagHopByHop != 0 {
		header("Keep-Alive", "timeout=5")
		header("Proxy-Connection", "keep-alive")
		header("Proxy-Authorization", "Basic Zm9vOmJhcg==")
		header("Te", "trailers")
		header("Upgrade", "h2c")
	}
	if flags&flagConnNamesIt != 0 {
		header("Connection", extraName)
	}
	if extraName != "" {
		header(extraName, extraValue)
	}
	b.WriteString("\r\n")
	return b.String()
}

// expectedOutcome is what the proxy's decision (decide, whose rules
// TestDecide tabulates) says of r as the handler receives it: the status,
// and whether the upstream is asked. The fake IMDS answers 200 to whatever
// is forwarded.
func expectedOutcome(ip *inProcess, r *http.Request, caller netip.Addr) (status int, forward bool) {
	if status, forward = ip.p.Decide(r, caller); forward {
		return http.StatusOK, true
	}
	return status, false
}

var proxyIDSyntax = regexp.MustCompile(`^[0-9a-f]{16}$`)

// checkUpstreamRequest checks one request the upstream received for the
// client request r.
func checkUpstreamRequest(t *testing.T, ip *inProcess, raw string, r *http.Request, s seenRequest, flags uint8, extraName string, proxyID *string) {
	t.Helper()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("%q: the upstream saw %s", raw, fmt.Sprintf(format, args...))
	}
	if s.Method != r.Method || (s.Method != http.MethodGet && s.Method != http.MethodHead) {
		fail("method %q for a client %q", s.Method, r.Method)
	}
	if s.Host != ip.upstream.addr {
		fail("Host %q, want its own address %q", s.Host, ip.upstream.addr)
	}
	got := s.Header.Values(imdsapi.TokenHeader)
	if ip.sessionToken == "" && len(got) != 0 || ip.sessionToken != "" && (len(got) != 1 || got[0] != ip.sessionToken) {
		fail("token headers %q, want only the proxy's session token %q", got, ip.sessionToken)
	}
	for _, name := range []string{imdsapi.TokenTTLHeader, "X-Forwarded-For", "Forwarded", "Via", "Keep-Alive", "Proxy-Connection",
		"Proxy-Authorization", "Proxy-Authenticate", "Te", "Trailer", "Transfer-Encoding", "Upgrade"} {
		if v, ok := s.Header[http.CanonicalHeaderKey(name)]; ok {
			fail("%s: %q", name, v)
		}
	}
	// Not even Connection: close: a client closing its connection must not
	// close the proxy's pooled connection to IMDS.
	if v := s.Header.Values("Connection"); len(v) > 0 {
		fail("Connection: %q", v)
	}
	if s.ContentLength > 0 || len(s.TransferEncoding) > 0 || s.BodyBytes > 0 {
		fail("a body (Content-Length %d, Transfer-Encoding %q, %d bytes)", s.ContentLength, s.TransferEncoding, s.BodyBytes)
	}
	ids := s.Header.Values("X-Imds-Proxy-Id")
	if len(ids) != 1 || !proxyIDSyntax.MatchString(ids[0]) || (*proxyID != "" && ids[0] != *proxyID) {
		fail("X-Imds-Proxy-Id %q, want the proxy's own id %q only", ids, *proxyID)
	}
	*proxyID = ids[0]
	if flags&flagConnNamesIt != 0 {
		name := http.CanonicalHeaderKey(strings.TrimSpace(extraName))
		switch name {
		case "", "Host", "Connection", "X-Imds-Proxy-Id", imdsapi.TokenHeader: // the proxy sets these itself
		default:
			if v, ok := s.Header[name]; ok {
				fail("%s: %q, which the client's Connection header named", name, v)
			}
		}
	}

	// The path: what was checked is what the upstream decodes.
	want, err := proxy.NormalisePath(r.URL.EscapedPath())
	if err != nil || s.Path != want {
		fail("path %q for a client path %q, want %q (%v)", s.Path, r.URL.EscapedPath(), want, err)
	}
	wirePath, _, _ := strings.Cut(s.RequestURI, "?")
	if again, err := proxy.NormalisePath(wirePath); err != nil || again != s.Path {
		fail("request target %q, which normalises to %q (%v), not to the path checked %q", s.RequestURI, again, err, s.Path)
	}
	if !strings.HasPrefix(s.Path, "/") || strings.Contains(s.Path, "//") || hasDotSegment(s.Path) {
		fail("path %q, which is not clean", s.Path)
	}
	for _, prefix := range fuzzDeny {
		if segmentsUnder(prefix, s.Path) {
			fail("denied path %q", s.Path)
		}
	}
}
