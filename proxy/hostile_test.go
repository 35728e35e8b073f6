package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// TestHostileInput sends malformed and adversarial requests, each with the
// status it must get and whether anything may reach the upstream; afterwards
// the real AWS SDK must still be served.
func TestHostileInput(t *testing.T) {
	h, tap := startBehindAEMM(t)
	trap := newTrap(t)
	tok := h.token()
	other := h.tokenFrom(loopbackAddr("127.0.0.2"))
	auth := imdsapi.TokenHeader + ": " + tok + "\r\n"
	get := func(path string) string { return "GET " + path + " HTTP/1.1\r\nHost: x\r\n" + auth + "\r\n" }
	ttlPut := func(ttl string) string {
		return "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenTTLHeader + ": " + ttl + "\r\nContent-Length: 0\r\n\r\n"
	}
	cases := []struct {
		name      string
		request   string
		status    int
		forwarded bool
	}{
		{"garbage request line", "HELLO\r\n\r\n", 400, false},
		{"missing HTTP version", "GET /latest/meta-data/\r\n\r\n", 400, false},
		{"HTTP/2 preface as HTTP/1", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 405, false},
		{"unknown HTTP version", "GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505, false},
		{"absolute URI elsewhere", fmt.Sprintf("GET %s/ HTTP/1.1\r\nHost: x\r\n\r\n", trap.URL()), 403, false},
		{"absolute https URI", "GET https://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n", 403, false},
		{"CONNECT elsewhere", fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", trap.Addr(), trap.Addr()), 403, false},
		{"OPTIONS * (answered by net/http itself)", "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 200, false},
		{"TRACE", "TRACE /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n" + auth + "\r\n", 405, false},
		{"Host elsewhere", fmt.Sprintf("GET /latest/meta-data/ HTTP/1.1\r\nHost: %s\r\n%s\r\n", trap.Addr(), auth), 200, true},
		{"two Host headers", "GET /latest/meta-data/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + auth + "\r\n", 400, false},
		{"X-Forwarded-Host game", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: evil\r\n" + auth + "\r\n", 200, true},
		{"token PUT with X-Forwarded-For", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n" + imdsapi.TokenTTLHeader + ": 60\r\nContent-Length: 0\r\n\r\n", 403, false},
		{"token PUT with x-forwarded-for lower case", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nx-forwarded-for: 1.2.3.4\r\n" + imdsapi.TokenTTLHeader + ": 60\r\nContent-Length: 0\r\n\r\n", 403, false},
		{"TTL negative", ttlPut("-1"), 400, false},
		{"TTL huge", ttlPut("99999999999999999999"), 400, false},
		{"TTL float", ttlPut("60.0"), 400, false},
		{"TTL hex", ttlPut("0x3c"), 400, false},
		{"TTL with spaces inside", ttlPut("6 0"), 400, false},
		{"TTL twice", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenTTLHeader + ": 60\r\n" + imdsapi.TokenTTLHeader + ": 60\r\nContent-Length: 0\r\n\r\n", 400, false},
		{"TTL oversized header", ttlPut(strings.Repeat("9", 20000)), 400, false}, // refused by the TTL parser, not echoed whole
		{"chunked token PUT", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenTTLHeader + ": 60\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 200, false},
		{"forged token", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenHeader + ": " + strings.Repeat("A", len(tok)) + "\r\n\r\n", 401, false},
		{"truncated token", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenHeader + ": " + tok[:len(tok)-3] + "\r\n\r\n", 401, false},
		{"token with trailing junk", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenHeader + ": " + tok + "x\r\n\r\n", 401, false},
		{"other caller's token", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenHeader + ": " + other + "\r\n\r\n", 401, false},
		{"empty token", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenHeader + ": \r\n\r\n", 401, false},
		{"two tokens", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n" + auth + auth + "\r\n", 400, false},
		{"path traversal", get("/latest/meta-data/../../etc/passwd"), 404, true},
		{"encoded traversal", get("/latest/meta-data/%2e%2e/%2e%2e/etc/passwd"), 404, true},
		{"double-encoded traversal", get("/latest/%252e%252e/etc"), 400, false},
		{"NUL in path", get("/latest/meta-data/%00"), 400, false},
		{"backslash path", get("/latest\\meta-data"), 400, false},
		{"very long path", get("/latest/" + strings.Repeat("a", 15000)), 404, true},
		{"HTTP/1.0 without Host", "GET /latest/meta-data/ HTTP/1.0\r\n" + auth + "\r\n", 200, true},
		{"HTTP/1.1 without Host", "GET /latest/meta-data/ HTTP/1.1\r\n" + auth + "\r\n", 400, false},
		{"Connection-named hop header", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nConnection: X-Secret\r\nX-Secret: s\r\n" + auth + "\r\n", 200, true},
		{"Upgrade to websocket", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + auth + "\r\n", 200, true},
		{"GET with a body", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" + auth + "\r\nhello", 200, true},
		// net/http reads chunked and drops Content-Length (RFC 9112 6.3); the
		// body is not forwarded, so nothing can be smuggled upstream.
		{"conflicting Content-Length and chunked", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n" + auth + "\r\n0\r\n\r\n", 200, true},
		{"header without colon", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nBroken header\r\n" + auth + "\r\n", 400, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := len(tap.Requests())
			r := h.raw(c.request)
			if r.status != c.status {
				t.Errorf("status %d, want %d (body %.80q)", r.status, c.status, r.body)
			}
			seen := tap.Requests()[before:]
			if !c.forwarded && len(seen) != 0 {
				t.Errorf("upstream saw %+v, want nothing", seen)
			}
			for _, s := range seen {
				for _, name := range []string{"X-Secret", "Upgrade", "X-Forwarded-For"} {
					if s.Header.Get(name) != "" {
						t.Errorf("upstream saw %s", name)
					}
				}
				if s.Header.Get("Content-Length") != "" || s.Header.Get("Transfer-Encoding") != "" {
					t.Errorf("upstream saw a request body framing header")
				}
				if s.Header.Get(imdsapi.TokenHeader) == tok || s.Host != tap.Addr() {
					t.Errorf("upstream saw the client token or Host %q", s.Host)
				}
			}
		})
	}
	if len(cases) < 40 {
		t.Errorf("%d cases, the table promises at least 40", len(cases))
	}
	if n := trap.Conns(); n != 0 {
		t.Errorf("the trap saw %d connections", n)
	}
	// And the real AWS SDK still gets its answer.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := imds.New(imds.Options{Endpoint: h.url}).GetMetadata(ctx, &imds.GetMetadataInput{Path: "instance-id"})
	if err != nil {
		t.Fatalf("after the hostile table, the SDK got %v", err)
	}
	defer out.Content.Close()
	if id, _ := io.ReadAll(out.Content); string(id) != "i-1234567890abcdef0" {
		t.Errorf("after the hostile table, the SDK read %q", id)
	}
}

// TestV1LogFloodIsBounded: tokenless requests with 16 KiB User-Agents and
// long paths, as fast as one client sends them, cost the log a few
// truncated lines and one summary at the default level (info), not a line
// each; another caller's first request is still logged on its own.
func TestV1LogFloodIsBounded(t *testing.T) {
	const window = 3 * time.Second
	h, _ := startBehindAEMM(t, withV1(imdsapi.V1Block), configured(func(c *proxy.Config) { c.V1LogInterval = window }))
	const flood = 500
	pad := strings.Repeat("A", 16<<10-64)
	long := "/latest/meta-data/" + strings.Repeat("p", 4000)
	start := time.Now()
	for i := 0; i < flood; i++ {
		h.do("GET", long+strconv.Itoa(i), http.Header{"User-Agent": {fmt.Sprintf("hostile-%d/%s", i, pad)}})
	}
	h.doFrom(loopbackAddr("127.0.0.2"), "GET", "/latest/meta-data/", http.Header{"User-Agent": {"legacy-script/1.0"}})
	// The limit is per window: a flood slowed down by a loaded machine
	// spans more of them, and may cost more lines.
	windows := int(time.Since(start)/window) + 1
	// Every request is accounted for, in a line of its own or in a
	// summary at the end of a window.
	var lines, summaries []observer.LoggedEntry
	var summarized uint64
	eventually(10*time.Second, 50*time.Millisecond, func() bool {
		lines = h.logsContaining("IMDSv1 request (no token)")
		summaries = h.logsContaining("IMDSv1 requests (no token) not logged one by one")
		summarized = 0
		for _, s := range summaries {
			summarized += s.ContextMap()["count"].(uint64)
		}
		return uint64(len(lines))+summarized == flood+1
	})
	if uint64(len(lines))+summarized != flood+1 || len(summaries) == 0 || len(lines) > 20*windows {
		t.Errorf("%d lines and %d summaries counting %d requests, want a few lines and summaries accounting for all %d", len(lines), len(summaries), summarized, flood+1)
	}
	for _, s := range summaries {
		if p, _ := s.ContextMap()["last_path"].(string); !strings.HasPrefix(p, "/latest/meta-data/ppp") {
			t.Errorf("summary's last path %.40q..., want the flood's", p)
		}
	}
	if !slices.ContainsFunc(lines, func(e observer.LoggedEntry) bool { return e.ContextMap()["caller"] == "127.0.0.2" }) {
		t.Error("another caller's request was not logged while the flood's were held back")
	}
	for _, e := range h.logs.All() {
		for k, v := range e.ContextMap() {
			if s, ok := v.(string); ok && len(s) > 256 {
				t.Errorf("log %q field %s holds %d bytes of the client's, want at most 256", e.Message, k, len(s))
			}
		}
	}
	budget := max(64<<10, 32<<10*windows)
	n := loggedBytes(t, h, zapcore.InfoLevel)
	t.Logf("%d requests: %d lines, %d summaries, %d bytes of log", flood+1, len(lines), len(summaries), n)
	if n > budget {
		t.Errorf("%d tokenless requests in %d log windows wrote %d bytes of log at info and above, want at most %d", flood, windows, n, budget)
	}
}

// loggedBytes is how many bytes the entries of h at min or above take as
// the binary writes them (JSON, zap's production encoder).
func loggedBytes(t *testing.T, h *harness, min zapcore.Level) int {
	t.Helper()
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	total := 0
	for _, e := range h.logs.All() {
		if e.Level < min {
			continue
		}
		buf, err := enc.EncodeEntry(e.Entry, e.Context)
		if err != nil {
			t.Fatal(err)
		}
		total += buf.Len()
		buf.Free()
	}
	return total
}
