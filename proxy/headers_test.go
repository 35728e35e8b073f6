package proxy_test

import (
	"net/http"
	"sort"
	"strings"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// TestUpstreamSeesOnlyTheProxysHeaders: whatever a client sends, the
// upstream receives the proxy's session token, its loop-detection id and its
// User-Agent, and nothing else, so requests for the same path are identical
// upstream and may share one answer.
func TestUpstreamSeesOnlyTheProxysHeaders(t *testing.T) {
	h, tap := startBehindAEMM(t)
	tok := h.token()
	clientHeaders := []http.Header{
		{imdsapi.TokenHeader: {tok}},
		{}, // IMDSv1
		{
			imdsapi.TokenHeader:    {tok},
			"User-Agent":           {"aws-sdk-go-v2/1.30.0 os/linux"},
			"Accept":               {"text/plain"},
			"Accept-Encoding":      {"gzip"},
			"Accept-Language":      {"fr"},
			"Range":                {"bytes=0-3"},
			"If-None-Match":        {`"x"`},
			"If-Modified-Since":    {"Mon, 02 Jan 2006 15:04:05 GMT"},
			"Cache-Control":        {"no-cache"},
			"Authorization":        {"Basic c2VjcmV0"},
			"Cookie":               {"a=b"},
			"X-Custom":             {"client"},
			imdsapi.TokenTTLHeader: {"300"},
			"X-Forwarded-For":      {"10.9.8.7"},
		},
	}
	for i, header := range clientHeaders {
		before := len(tap.Requests())
		if r := h.do("GET", "/latest/meta-data/instance-id", header); r.status != 200 || r.body != "i-1234567890abcdef0" {
			t.Fatalf("request %d: %d %q", i, r.status, r.body)
		}
		seen := tap.Requests()[before:]
		if len(seen) != 1 {
			t.Fatalf("request %d: the upstream saw %d requests, want 1", i, len(seen))
		}
		var names []string
		for name := range seen[0].Header {
			names = append(names, name)
		}
		sort.Strings(names)
		if got, want := strings.Join(names, " "), "User-Agent X-Aws-Ec2-Metadata-Token X-Imds-Proxy-Id"; got != want {
			t.Errorf("request %d: the upstream saw headers %s, want %s", i, got, want)
		}
		if ua := seen[0].Header.Get("User-Agent"); ua != "imds-proxy" {
			t.Errorf("request %d: the upstream saw User-Agent %q, want the proxy's own", i, ua)
		}
		if got := seen[0].Header.Get(imdsapi.TokenHeader); got == tok || got == "" {
			t.Errorf("request %d: the upstream saw token %q, want the proxy's session token", i, got)
		}
	}
}
