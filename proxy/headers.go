package proxy

import (
	"net/http"
	"net/textproto"
	"strings"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// hopByHopHeaders are meaningful only for one connection and are never
// forwarded (RFC 9110 section 7.6.1, as in net/http/httputil).
var hopByHopHeaders = []string{
	"Connection",
	"Proxy-Connection",
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

// forwardingHeaders reveal a proxy hop. IMDS refuses token requests carrying
// X-Forwarded-For; the proxy neither adds these nor passes a client's on.
var forwardingHeaders = []string{"X-Forwarded-For", "Forwarded", "Via"}

// removeHopByHop deletes the hop-by-hop headers and every header that the
// Connection header names. It must run before anything deletes Connection.
func removeHopByHop(h http.Header) {
	for _, value := range h.Values("Connection") {
		for _, name := range strings.Split(value, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopByHopHeaders {
		h.Del(name)
	}
}

// removeForwarding deletes headers that describe proxy hops.
func removeForwarding(h http.Header) {
	for _, name := range forwardingHeaders {
		h.Del(name)
	}
}

// upstreamHeader is the whole header of a forwarded request: the proxy's
// loop-detection id, its User-Agent and its session token (none in IMDSv1
// fallback). IMDS answers a GET by its path and token alone. No header of the
// client's is sent (Range, conditionals, Accept-Encoding, its User-Agent), so
// requests for one path are identical upstream and may share one answer.
func upstreamHeader(proxyID, sessionToken string) http.Header {
	h := http.Header{imdsapi.LoopHeader: {proxyID}, "User-Agent": {imdsapi.UserAgent}}
	if sessionToken != "" {
		h.Set(imdsapi.TokenHeader, sessionToken)
	}
	return h
}
