package proxy_test

import (
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// limitedConfig is a proxy configuration with limits, in front of a healthy
// upstream that the caller closes.
func limitedConfig(t *testing.T, limits proxy.ServerLimits) (proxy.Config, *scriptedIMDS) {
	up := newScriptedIMDS(t, func(string, int) int { return 200 })
	cfg := testConfig(up.srv.URL)
	cfg.Limits = limits
	return cfg, up
}

func testLimits() proxy.ServerLimits {
	l := proxy.DefaultServerLimits()
	l.MaxHeaderBytes, l.MaxBodyBytes, l.ReadHeaderTimeout = 2048, 64, 300*time.Millisecond
	l.MaxConnections, l.MaxConnectionsPerClient = 20, 10
	return l
}

// rawExchange writes request on a new connection and reads one response.
func rawExchange(t *testing.T, addr, request string) (int, string) {
	t.Helper()
	return rawExchangeFrom(t, nil, addr, request)
}

// rawExchangeFrom is rawExchange from a given local address (nil: any).
func rawExchangeFrom(t *testing.T, local net.Addr, addr, request string) (int, string) {
	t.Helper()
	r := rawResponse(t, local, addr, request)
	return r.status, r.body
}

// TestRequestSizeLimits: oversized headers get 431 and oversized bodies 413,
// however they are framed, each counted; requests within the limits pass.
func TestRequestSizeLimits(t *testing.T) {
	cfg, up := limitedConfig(t, testLimits())
	defer up.srv.Close()
	s := serveProxy(t, cfg)
	defer s.stop()
	put := "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n" + token.TTLHeader + ": 300\r\n"
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
		if status, _ := rawExchange(t, s.addr, c.request); status != c.status {
			t.Errorf("%s: %d, want %d", c.name, status, c.status)
		}
	}
	for outcome, want := range map[string]float64{"header_too_large": 2, "body_too_large": 2} {
		if got := metricOf(t, s, "imds_proxy_requests_total", "outcome", outcome); got != want {
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
	cfg, up := limitedConfig(t, limits)
	defer up.srv.Close()
	s := serveProxy(t, cfg)
	defer s.stop()
	get := "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n"
	for round := 1; round <= 2; round++ {
		waitOpen(t, s, 0)
		held := holdConnections(t, s, limits.MaxConnectionsPerClient, "127.0.0.1")
		if status, _ := rawExchangeFrom(t, loopbackAddr("127.0.0.1"), s.addr, get); status != http.StatusServiceUnavailable {
			t.Errorf("round %d: one connection past the per-client limit: %d, want 503", round, status)
		}
		held = append(held, holdConnections(t, s, limits.MaxConnections-limits.MaxConnectionsPerClient, "127.0.0.2")...)
		start := time.Now()
		if status, _ := rawExchangeFrom(t, loopbackAddr("127.0.0.3"), s.addr, get); status != http.StatusServiceUnavailable || time.Since(start) > time.Second {
			t.Errorf("round %d: connection %d from a new address: %d after %s, want 503 at once", round, limits.MaxConnections+1, status, time.Since(start))
		}
		for _, c := range held {
			c.Close()
		}
		waitOpen(t, s, 0)
		if status, _ := rawExchange(t, s.addr, "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n"+token.TTLHeader+": 60\r\n\r\n"); status != 200 {
			t.Errorf("round %d: after the held connections closed: %d, want 200", round, status)
		}
	}
	if got := metricOf(t, s, "imds_proxy_connections_rejected_total", "", ""); got != 4 {
		t.Errorf("rejected connections counted %v, want 4", got)
	}
}

// holdConnections opens n idle connections from the loopback address from,
// and waits until the proxy counts them.
func holdConnections(t *testing.T, s *served, n int, from string) []net.Conn {
	t.Helper()
	open := metricOf(t, s, "imds_proxy_connections_open", "", "")
	defer waitOpen(t, s, open+float64(n))
	var held []net.Conn
	for i := 0; i < n; i++ {
		c, err := (&net.Dialer{LocalAddr: loopbackAddr(from)}).Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	return held
}

// waitOpen waits until the proxy holds exactly n client connections.
func waitOpen(t *testing.T, s *served, n float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for metricOf(t, s, "imds_proxy_connections_open", "", "") != n {
		if time.Now().After(deadline) {
			t.Fatalf("the proxy holds %v connections, never %v", metricOf(t, s, "imds_proxy_connections_open", "", ""), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func loopbackAddr(ip string) net.Addr { return &net.TCPAddr{IP: net.ParseIP(ip)} }

// TestSlowClientsCannotStarveTheProxy: clients dribbling their headers a
// byte at a time from one address, more of them than that address may hold,
// get 503 past the per-client limit, lose their connections at the
// read-header timeout and are counted; meanwhile another address is served
// at once.
func TestSlowClientsCannotStarveTheProxy(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	limits := testLimits()
	cfg, up := limitedConfig(t, limits)
	defer up.srv.Close()
	s := serveProxy(t, cfg)
	defer s.stop()
	slow := limits.MaxConnectionsPerClient + 5
	var wg sync.WaitGroup
	cut := make(chan time.Duration, slow)
	for i := 0; i < slow; i++ {
		c, err := (&net.Dialer{LocalAddr: loopbackAddr("127.0.0.1")}).Dial("tcp", s.addr)
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
		status, _ := rawExchangeFrom(t, loopbackAddr("127.0.0.2"), s.addr, "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n"+token.TTLHeader+": 60\r\n\r\n")
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
	if got := metricOf(t, s, "imds_proxy_connections_rejected_total", "", ""); got != 5 {
		t.Errorf("rejected connections counted %v, want 5 (past the per-client limit)", got)
	}
	if got := metricOf(t, s, "imds_proxy_connections_closed_without_request_total", "", ""); got < float64(limits.MaxConnectionsPerClient) {
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

// metricOf reads a counter or gauge of s's registry, optionally by one label.
func metricOf(t *testing.T, s *served, name, label, value string) float64 {
	t.Helper()
	var labels map[string]string
	if label != "" {
		labels = map[string]string{label: value}
	}
	return gatherValue(t, s.reg, name, labels)
}
