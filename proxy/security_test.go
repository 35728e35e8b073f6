package proxy_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// TestNotAnOpenProxy sends the requests that would turn a careless proxy into
// an open one. The trap is a listener elsewhere on loopback: nothing may ever
// reach it, and nothing refused may reach the upstream.
func TestNotAnOpenProxy(t *testing.T) {
	h, tap := startBehindAEMM(t)
	trap := newTrap(t)
	tok := h.token()
	cases := []struct {
		name      string
		request   string
		status    int
		forwarded bool
	}{
		{"absolute URI elsewhere", fmt.Sprintf("GET %s/latest/meta-data/ HTTP/1.1\r\nHost: %s\r\n\r\n", trap.URL(), trap.Addr()), 403, false},
		{"absolute URI to the upstream itself", fmt.Sprintf("GET %s/latest/meta-data/ HTTP/1.1\r\nHost: %s\r\n\r\n", tap.URL(), tap.Addr()), 403, false},
		{"absolute URI token PUT", fmt.Sprintf("PUT %s/latest/api/token HTTP/1.1\r\nHost: %s\r\n%s: 300\r\nContent-Length: 0\r\n\r\n", trap.URL(), trap.Addr(), imdsapi.TokenTTLHeader), 403, false},
		{"CONNECT elsewhere", fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", trap.Addr(), trap.Addr()), 403, false},
		{"CONNECT to the upstream", fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", tap.Addr(), tap.Addr()), 403, false},
		{"Host header elsewhere", fmt.Sprintf("GET /latest/meta-data/ HTTP/1.1\r\nHost: %s\r\n%s: %s\r\n\r\n", trap.Addr(), imdsapi.TokenHeader, tok), 200, true},
		{"Host header with userinfo (refused by net/http)", fmt.Sprintf("GET /latest/meta-data/ HTTP/1.1\r\nHost: user@%s\r\n%s: %s\r\n\r\n", trap.Addr(), imdsapi.TokenHeader, tok), 400, false},
		{"scheme-relative path", fmt.Sprintf("GET //%s/latest/meta-data/ HTTP/1.1\r\nHost: x\r\n%s: %s\r\n\r\n", trap.Addr(), imdsapi.TokenHeader, tok), 404, true}, // normalised to /<trap addr>/latest/meta-data/ on the upstream
		{"websocket upgrade", fmt.Sprintf("GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n%s: %s\r\n\r\n", imdsapi.TokenHeader, tok), 200, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := len(tap.Requests())
			r := h.raw(c.request)
			if r.status != c.status {
				t.Fatalf("status %d, want %d (body %q)", r.status, c.status, r.body)
			}
			seen := tap.Requests()[before:]
			switch {
			case !c.forwarded && len(seen) != 0:
				t.Errorf("upstream saw %+v, want nothing", seen)
			case c.forwarded && len(seen) != 1:
				t.Errorf("upstream saw %d requests, want 1", len(seen))
			case c.forwarded && seen[0].Host != tap.Addr():
				t.Errorf("upstream saw Host %q, want its own address %q", seen[0].Host, tap.Addr())
			case c.forwarded && seen[0].Header.Get("Upgrade") != "":
				t.Errorf("upstream saw Upgrade %q", seen[0].Header.Get("Upgrade"))
			}
		})
	}
	if n := trap.Conns(); n != 0 {
		t.Errorf("the trap accepted %d connections; the proxy must only ever contact its upstream", n)
	}
}

// TestForwardedHeaders checks hop-by-hop handling and that the proxy never
// adds or passes on X-Forwarded-For, Forwarded or Via.
func TestForwardedHeaders(t *testing.T) {
	h, tap := startBehindAEMM(t)
	tok := h.token()
	before := len(tap.Requests())
	r := h.do("GET", "/latest/meta-data/instance-id", http.Header{
		imdsapi.TokenHeader:    {tok},
		imdsapi.TokenTTLHeader: {"300"},
		"User-Agent":           {"aws-sdk-go-v2/1.30.0 os/linux"},
		"Accept-Encoding":      {"identity"},
		"Connection":           {"keep-alive, X-Private-Hop"},
		"X-Private-Hop":        {"must not travel"},
		"Keep-Alive":           {"timeout=5"},
		"Proxy-Authorization":  {"Basic c2VjcmV0"},
		"Proxy-Connection":     {"keep-alive"},
		"Te":                   {"trailers"},
		"Upgrade":              {"h2c"},
		"X-Forwarded-For":      {"10.9.8.7"},
		"Forwarded":            {"for=10.9.8.7"},
		"Via":                  {"1.1 somewhere"},
		"X-Custom":             {"kept"},
	})
	if r.status != 200 {
		t.Fatalf("status %d, want 200", r.status)
	}
	seen := tap.Requests()[before:]
	if len(seen) != 1 {
		t.Fatalf("upstream saw %d requests, want 1", len(seen))
	}
	got := seen[0].Header
	for _, name := range []string{"X-Private-Hop", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection",
		"Te", "Upgrade", "X-Forwarded-For", "Forwarded", "Via", imdsapi.TokenTTLHeader} {
		if v, ok := got[http.CanonicalHeaderKey(name)]; ok {
			t.Errorf("upstream saw %s: %q", name, v)
		}
	}
	if c := got.Get("Connection"); c != "" && !strings.EqualFold(c, "keep-alive") && !strings.EqualFold(c, "close") {
		t.Errorf("upstream saw Connection %q", c)
	}
	// Which of the client's other headers travel is TestUpstreamSeesOnlyTheProxysHeaders's business.
	if got.Get(imdsapi.TokenHeader) == tok {
		t.Error("the client's token was forwarded upstream")
	}
}
