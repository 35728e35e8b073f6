package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// limitedProxy serves a proxy with limits as the binary does, in front of a
// healthy fake IMDS; the test stops both.
func limitedProxy(t *testing.T, limits proxy.ServerLimits) (*harness, *fakeIMDS) {
	up := newFakeIMDS(t, requiringTokens(), numberedAnswers())
	return startProxy(t, up.url, servedAsTheBinary(), configured(func(c *proxy.Config) { c.Limits = limits })), up
}

func testLimits() proxy.ServerLimits {
	l := proxy.DefaultServerLimits()
	l.MaxHeaderBytes, l.MaxBodyBytes, l.ReadHeaderTimeout = 2048, 64, 300*time.Millisecond
	l.MaxConnections, l.MaxConnectionsPerClient = 20, 10
	return l
}

// TestRequestSizeLimits: oversized headers get 431 and oversized bodies 413,
// however they are framed, each counted; requests within the limits pass.
func TestRequestSizeLimits(t *testing.T) {
	s, up := limitedProxy(t, testLimits())
	defer up.close()
	defer s.stop()
	put := "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenTTLHeader + ": 300\r\n"
	cases := []struct {
		name, request string
		status        int
	}{
		{"small PUT", put + "\r\n", 200},
		{"big header", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Pad: " + strings.Repeat("a", 3000) + "\r\n\r\n", 431},
		{"long path", "GET /latest/" + strings.Repeat("p", 3000) + " HTTP/1.1\r\nHost: x\r\n\r\n", 431},
		{"body within limit", put + "Content-Length: 10\r\n\r\n0123456789", 200},
		{"declared big body", put + "Content-Length: 100000\r\n\r\n" + strings.Repeat("b", 100), 413},
		{"chunked big body", put + "Transfer-Encoding: chunked\r\n\r\n" + "40\r\n" + strings.Repeat("c", 64) + "\r\n40\r\n" + strings.Repeat("c", 64) + "\r\n0\r\n\r\n", 413},
		{"chunked small body", put + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 200},
	}
	for _, c := range cases {
		if status := s.raw(c.request).status; status != c.status {
			t.Errorf("%s: %d, want %d", c.name, status, c.status)
		}
	}
	for outcome, want := range map[string]float64{"header_too_large": 2, "body_too_large": 2} {
		if got := s.metric("imds_proxy_requests_total", map[string]string{"outcome": outcome}); got != want {
			t.Errorf("outcome %s counted %v, want %v", outcome, got, want)
		}
	}
}

// TestConnectionLimit: connections past the maximum, in all or from one
// address, get an immediate 503 (not a silent queue) and are counted; when
// the held ones close, every slot is free again (the count does not leak).
func TestConnectionLimit(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	limits := testLimits()
	limits.ReadHeaderTimeout = 10 * time.Second
	s, up := limitedProxy(t, limits)
	defer up.close()
	defer s.stop()
	get := "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n"
	for round := 1; round <= 2; round++ {
		waitOpen(t, s, 0)
		held := holdConnections(t, s, limits.MaxConnectionsPerClient, "127.0.0.1")
		if status := s.rawFrom(loopbackAddr("127.0.0.1"), get).status; status != http.StatusServiceUnavailable {
			t.Errorf("round %d: one connection past the per-client limit: %d, want 503", round, status)
		}
		held = append(held, holdConnections(t, s, limits.MaxConnections-limits.MaxConnectionsPerClient, "127.0.0.2")...)
		start := time.Now()
		if status := s.rawFrom(loopbackAddr("127.0.0.3"), get).status; status != http.StatusServiceUnavailable || time.Since(start) > time.Second {
			t.Errorf("round %d: connection %d from a new address: %d after %s, want 503 at once", round, limits.MaxConnections+1, status, time.Since(start))
		}
		for _, c := range held {
			c.Close()
		}
		waitOpen(t, s, 0)
		if status := s.raw(tokenPUT).status; status != 200 {
			t.Errorf("round %d: after the held connections closed: %d, want 200", round, status)
		}
	}
	for limit, want := range map[string]float64{"per_client": 2, "total": 2} {
		if got := s.metric("imds_proxy_connections_rejected_total", map[string]string{"limit": limit}); got != want {
			t.Errorf("rejected connections counted %v for limit=%s, want %v", got, limit, want)
		}
	}
}

// holdConnections opens n idle connections from the loopback address from,
// and waits until the proxy counts them.
func holdConnections(t *testing.T, s *harness, n int, from string) []net.Conn {
	t.Helper()
	open := s.metric("imds_proxy_connections_open", nil)
	defer waitOpen(t, s, open+float64(n))
	var held []net.Conn
	for i := 0; i < n; i++ {
		c, err := s.dial(loopbackAddr(from))
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	return held
}

// waitOpen waits until the proxy holds exactly n client connections.
func waitOpen(t *testing.T, s *harness, n float64) {
	t.Helper()
	waitGauge(t, s, "imds_proxy_connections_open", n)
}

// waitIdle waits until exactly n client connections are idle between
// requests: net/http marks one so a little after its client has read the
// response, and only then may it be reclaimed.
func waitIdle(t *testing.T, s *harness, n float64) {
	t.Helper()
	waitGauge(t, s, "imds_proxy_connections_idle", n)
}

func waitGauge(t *testing.T, s *harness, name string, n float64) {
	t.Helper()
	if !eventually(5*time.Second, 5*time.Millisecond, func() bool { return s.metric(name, nil) == n }) {
		t.Fatalf("%s is %v, never %v", name, s.metric(name, nil), n)
	}
}

// TestSlowClientsCannotStarveTheProxy: clients dribbling their headers a
// byte at a time from one address, more of them than that address may hold,
// get 503 past the per-client limit, lose their connections at the
// read-header timeout and are counted; meanwhile another address is served
// at once.
func TestSlowClientsCannotStarveTheProxy(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	limits := testLimits()
	s, up := limitedProxy(t, limits)
	defer up.close()
	defer s.stop()
	slow := limits.MaxConnectionsPerClient + 5
	var wg sync.WaitGroup
	cut := make(chan time.Duration, slow)
	for i := 0; i < slow; i++ {
		c, err := s.dial(loopbackAddr("127.0.0.1"))
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			cut <- dribble(c)
		}()
	}
	for i := 0; i < 5; i++ {
		start := time.Now()
		status := s.rawFrom(loopbackAddr("127.0.0.2"), tokenPUT).status
		if status != 200 || time.Since(start) > 200*time.Millisecond {
			t.Errorf("another client during the slow ones: %d after %s", status, time.Since(start))
		}
		time.Sleep(30 * time.Millisecond)
	}
	wg.Wait()
	close(cut)
	for d := range cut {
		if d > 2*time.Second {
			t.Errorf("a slow client held its connection for %s; the read-header timeout is %s", d, limits.ReadHeaderTimeout)
		}
	}
	if got := s.metric("imds_proxy_connections_rejected_total", map[string]string{"limit": "per_client"}); got != 5 {
		t.Errorf("rejected connections counted %v for limit=per_client, want 5", got)
	}
	if got := s.metric("imds_proxy_connections_reclaimed_total", nil); got != 0 {
		t.Errorf("reclaimed %v connections that never carried a request, want none", got)
	}
	if got := s.metric("imds_proxy_connections_closed_without_request_total", nil); got < float64(limits.MaxConnectionsPerClient) {
		t.Errorf("connections closed without a request counted %v, want at least %d", got, limits.MaxConnectionsPerClient)
	}
}

// dribble sends a request's headers a byte every 50 ms until the server
// closes the connection, and says how long that took.
func dribble(c net.Conn) time.Duration {
	start := time.Now()
	for _, b := range []byte("GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + strings.Repeat("s", 100)) {
		if _, err := c.Write([]byte{b}); err != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
		_ = c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err == io.EOF {
			break
		}
	}
	return time.Since(start)
}

// TestGreedyClientsCannotStarveTheNode: client
// addresses holding idle keep-alive connections (one request served on
// each) up to the node agent's limits must not keep a new address from
// being served. With the limits of old (1,024 per address), four addresses
// filled all 4,096 and every other got 503.
func TestGreedyClientsCannotStarveTheNode(t *testing.T) {
	issue := proxy.DefaultNodeServerLimits()
	issue.MaxConnectionsPerClient = 1024
	cases := []struct {
		name               string
		limits             proxy.ServerLimits
		greedy, each, open int
		reclaimedWhileOpen float64 // reclaimed while the greedy clients open theirs
	}{
		// The four fill the 4,096; the newcomer reclaims one of theirs.
		{"the issue's 4x1024 at 4096/1024", issue, 4, 1024, 4096, 0},
		// Each reclaims its own past 256; 3,072 slots stay free.
		{"4x1024 at the node defaults", proxy.DefaultNodeServerLimits(), 4, 1024, 1024, 4 * (1024 - 256)},
		// Sixteen at their cap fill the 4,096; the newcomer reclaims one.
		{"16x256 at the node defaults", proxy.DefaultNodeServerLimits(), 16, 256, 4096, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
			s, up := limitedProxy(t, c.limits)
			defer up.close()
			defer s.stop()
			var held []net.Conn
			defer func() {
				for _, c := range held {
					c.Close()
				}
			}()
			start := time.Now()
			for i := 0; i < c.greedy; i++ {
				held = append(held, keepAliveConnections(t, s, c.each, fmt.Sprintf("127.0.0.%d", 2+i))...)
			}
			waitOpen(t, s, float64(c.open))
			waitIdle(t, s, float64(c.open))
			t.Logf("%d x %d keep-alive connections in %s", c.greedy, c.each, time.Since(start))
			if got := s.metric("imds_proxy_connections_reclaimed_total", nil); got != c.reclaimedWhileOpen {
				t.Errorf("reclaimed %v while the greedy clients opened theirs, want %v", got, c.reclaimedWhileOpen)
			}
			newcomer := fmt.Sprintf("127.0.0.%d", 2+c.greedy)
			start = time.Now()
			if status := s.rawFrom(loopbackAddr(newcomer), tokenPUT).status; status != 200 || time.Since(start) > time.Second {
				t.Errorf("a new client while %d hold %d idle connections each: %d after %s, want 200 at once", c.greedy, c.each, status, time.Since(start))
			}
			want := c.reclaimedWhileOpen
			if c.open == c.limits.MaxConnections {
				want++ // the newcomer's connection took one of theirs
			}
			if got := s.metric("imds_proxy_connections_reclaimed_total", nil); got != want {
				t.Errorf("reclaimed %v, want %v", got, want)
			}
			if got := s.metric("imds_proxy_connections_rejected_total", nil); got != 0 {
				t.Errorf("rejected %v, want none", got)
			}
		})
	}
}

const tokenPUT = "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n" + imdsapi.TokenTTLHeader + ": 60\r\n\r\n"

// keepAliveConnections opens n connections from the loopback address from,
// one after another, sends one request on each, reads its answer and keeps
// the connection open and idle, as an HTTP client's connection pool does.
func keepAliveConnections(t *testing.T, s *harness, n int, from string) []net.Conn {
	t.Helper()
	var held []net.Conn
	for i := 0; i < n; i++ {
		c, err := s.dial(loopbackAddr(from))
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
		if r := exchangeOn(t, c, tokenPUT); r.status != 200 {
			t.Fatalf("%s, connection %d: %d, want 200", from, i+1, r.status)
		}
	}
	return held
}

// reclaimLimits are small limits for the reclaim tests.
func reclaimLimits() proxy.ServerLimits {
	l := testLimits()
	l.MaxConnections, l.MaxConnectionsPerClient = 8, 4
	return l
}

// TestIdleConnectionsAreReclaimed: a new connection past a limit takes the
// place of an idle keep-alive connection: past its own cap, the client's
// longest idle, never another's; past the total, the longest idle of the
// client holding the most. The reclaimed connection is closed cleanly (EOF,
// not a reset); the others keep serving.
func TestIdleConnectionsAreReclaimed(t *testing.T) {
	const a, b, c, d = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
	t.Run("past its own cap, a client's own longest idle", func(t *testing.T) {
		defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
		s, _, done := reclaimProxy(t, nil)
		defer done()
		neighbour := keepAliveConnections(t, s, 4, b) // as many, idle longer
		defer closeAll(neighbour)
		held := keepAliveConnections(t, s, 4, a)
		defer closeAll(held)
		waitIdle(t, s, 8)
		held = append(held, keepAliveConnections(t, s, 1, a)...) // 200, or it fails
		expectClosed(t, held[0], "the longest idle of the client past its cap")
		for i, c := range append(held[1:], neighbour...) {
			if r := exchangeOn(t, c, tokenPUT); r.status != 200 {
				t.Errorf("connection %d kept: %d, want 200", i+1, r.status)
			}
		}
		waitOpen(t, s, 8)
		expectCounts(t, s, 1, 0, 0)
	})
	t.Run("past the total, the busiest client's longest idle", func(t *testing.T) {
		defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
		s, _, done := reclaimProxy(t, nil)
		defer done()
		older := keepAliveConnections(t, s, 3, b) // idle longer, but fewer
		defer closeAll(older)
		busiest := keepAliveConnections(t, s, 4, a)
		defer closeAll(busiest)
		defer closeAll(keepAliveConnections(t, s, 1, c))
		waitIdle(t, s, 8)
		if status := s.rawFrom(loopbackAddr(d), tokenPUT).status; status != 200 {
			t.Errorf("a new client with every slot held idle: %d, want 200", status)
		}
		expectClosed(t, busiest[0], "the longest idle of the client holding the most")
		if r := exchangeOn(t, older[0], tokenPUT); r.status != 200 {
			t.Errorf("the longest idle of all, of a client holding fewer: %d, want 200 (kept)", r.status)
		}
		expectCounts(t, s, 1, 0, 0)
	})
}

// TestInFlightConnectionsAreNeverReclaimed: a connection whose request is
// in the handler is never closed for a new one; the idle one is, even when
// younger; with none idle, the new connection gets 503, counted by the limit
// that refused it, and the requests in flight are answered.
func TestInFlightConnectionsAreNeverReclaimed(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	release := make(chan struct{})
	s, up, done := reclaimProxy(t, release)
	defer done()
	const a, b, c = "127.0.0.2", "127.0.0.3", "127.0.0.4"
	var inFlight []net.Conn
	defer func() { closeAll(inFlight) }()
	slow := 0
	hold := func(from string) net.Conn {
		t.Helper()
		conn := holdConnections(t, s, 1, from)[0]
		inFlight = append(inFlight, conn)
		sendSlow(t, up, conn, &slow)
		return conn
	}
	hold(a)
	idle := keepAliveConnections(t, s, 1, a)
	defer closeAll(idle)
	hold(a)
	hold(a)
	waitIdle(t, s, 1)
	younger := keepAliveConnections(t, s, 1, a) // 200: a's cap is reached, idle[0] makes room
	defer closeAll(younger)
	expectClosed(t, idle[0], "the client's one idle connection")
	inFlight = append(inFlight, younger[0])
	sendSlow(t, up, younger[0], &slow)
	waitIdle(t, s, 0)
	if status := s.rawFrom(loopbackAddr(a), tokenPUT).status; status != http.StatusServiceUnavailable {
		t.Errorf("past the client's cap with its every connection in flight: %d, want 503", status)
	}
	for i := 0; i < 4; i++ {
		hold(b)
	}
	if status := s.rawFrom(loopbackAddr(c), tokenPUT).status; status != http.StatusServiceUnavailable {
		t.Errorf("past the total with every connection in flight: %d, want 503", status)
	}
	close(release)
	for i, conn := range inFlight {
		if r := readResponse(t, conn); r.status != 200 {
			t.Errorf("request %d in flight: %d, want 200", i+1, r.status)
		}
	}
	expectCounts(t, s, 1, 1, 1)
}

// TestReclaimedClientRetries: a Go HTTP client whose pooled keep-alive
// connection is reclaimed sees a clean close: its next request gets 200 on a
// new connection, with no error.
func TestReclaimedClientRetries(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	s, _, done := reclaimProxy(t, nil)
	defer done()
	const a = "127.0.0.2"
	transport := &http.Transport{Proxy: nil, DialContext: (&net.Dialer{LocalAddr: loopbackAddr(a)}).DialContext}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: 10 * time.Second}
	get := func() (status int, reused bool) {
		t.Helper()
		trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) { reused = info.Reused }}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodGet, s.url+"/latest/meta-data/instance-id", nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("GET after its connection was reclaimed: %v", err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, reused
	}
	if status, _ := get(); status != 200 {
		t.Fatalf("first GET: %d", status)
	}
	held := keepAliveConnections(t, s, 3, a)
	defer func() { closeAll(held) }()
	waitIdle(t, s, 4)
	held = append(held, keepAliveConnections(t, s, 1, a)...) // reclaims the client's pooled connection
	if status, reused := get(); status != 200 || reused {
		t.Errorf("GET after its pooled connection was reclaimed: %d (last connection reused: %v), want 200 on a new one", status, reused)
	}
	// Its new connection took the place of the oldest raw one in turn.
	expectClosed(t, held[0], "the client's longest idle")
	expectCounts(t, s, 2, 0, 0)
}

// reclaimProxy serves a proxy with reclaimLimits. Paths under
// /latest/meta-data/slow wait at the upstream until release is closed.
func reclaimProxy(t *testing.T, release chan struct{}) (*harness, *fakeIMDS, func()) {
	t.Helper()
	up := newFakeIMDS(t, requiringTokens(), numberedAnswers(), holding("/latest/meta-data/slow", release))
	s := startProxy(t, up.url, servedAsTheBinary(), configured(func(c *proxy.Config) { c.Limits = reclaimLimits() }))
	return s, up, func() {
		if release != nil {
			select {
			case <-release:
			default:
				close(release)
			}
		}
		s.stop()
		up.close()
	}
}

// sendSlow sends a GET of the next slow path on conn and waits until the
// upstream holds it: the request is in the proxy's handler.
func sendSlow(t *testing.T, up *fakeIMDS, conn net.Conn, slow *int) {
	t.Helper()
	*slow++
	path := fmt.Sprintf("/latest/meta-data/slow-%d", *slow)
	if _, err := io.WriteString(conn, "GET "+path+" HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if !eventually(5*time.Second, time.Millisecond, func() bool { return up.count(path) > 0 }) {
		t.Fatalf("GET %s never reached the upstream", path)
	}
}

// expectClosed fails unless the proxy has closed c cleanly (EOF, not a
// reset) without writing anything more on it.
func expectClosed(t *testing.T, c net.Conn, what string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("%s: read %d bytes, %v; want EOF (closed by the proxy)", what, n, err)
	}
}

// expectCounts checks the reclaimed and rejected connection counters.
func expectCounts(t *testing.T, s *harness, reclaimed, perClient, total float64) {
	t.Helper()
	if got := s.metric("imds_proxy_connections_reclaimed_total", nil); got != reclaimed {
		t.Errorf("reclaimed %v, want %v", got, reclaimed)
	}
	for limit, want := range map[string]float64{"per_client": perClient, "total": total} {
		if got := s.metric("imds_proxy_connections_rejected_total", map[string]string{"limit": limit}); got != want {
			t.Errorf("rejected %v for limit=%s, want %v", got, limit, want)
		}
	}
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		c.Close()
	}
}
