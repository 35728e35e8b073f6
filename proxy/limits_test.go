package proxy_test

import (
	"bufio"
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
	l.MaxHeaderBytes, l.MaxBodyBytes, l.MaxConnections, l.ReadHeaderTimeout = 2048, 64, 20, 300*time.Millisecond
	return l
}

// rawExchange writes request on a new connection and reads one response.
func rawExchange(t *testing.T, addr, request string) (int, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading the answer to %.60q: %v", request, err)
	}
	body, _ := readBody(resp)
	return resp.StatusCode, body
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

// TestConnectionLimit: connections past the maximum get an immediate 503
// (not a silent queue), are counted, and service resumes when others close.
func TestConnectionLimit(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	limits := testLimits()
	limits.ReadHeaderTimeout = 10 * time.Second
	cfg, up := limitedConfig(t, limits)
	defer up.srv.Close()
	s := serveProxy(t, cfg)
	defer s.stop()
	var held []net.Conn
	for i := 0; i < limits.MaxConnections; i++ {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	start := time.Now()
	status, _ := rawExchange(t, s.addr, "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n")
	if status != http.StatusServiceUnavailable || time.Since(start) > time.Second {
		t.Errorf("connection %d: %d after %s, want 503 at once", limits.MaxConnections+1, status, time.Since(start))
	}
	if got := metricOf(t, s, "imds_proxy_connections_rejected_total", "", ""); got < 1 {
		t.Errorf("rejected connections counted %v, want at least 1", got)
	}
	for _, c := range held {
		c.Close()
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		if status, _ := rawExchange(t, s.addr, "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n"+token.TTLHeader+": 60\r\n\r\n"); status == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no service within 3s after the held connections closed")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSlowClientsCannotStarveTheProxy: clients dribbling their headers a
// byte at a time hold connections only until the read-header timeout, are
// counted, and meanwhile ordinary requests are served at once.
func TestSlowClientsCannotStarveTheProxy(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	limits := testLimits()
	cfg, up := limitedConfig(t, limits)
	defer up.srv.Close()
	s := serveProxy(t, cfg)
	defer s.stop()
	const slow = 15
	var wg sync.WaitGroup
	cut := make(chan time.Duration, slow)
	for i := 0; i < slow; i++ {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
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
			cut <- time.Since(start)
		}()
	}
	for i := 0; i < 5; i++ {
		start := time.Now()
		status, _ := rawExchange(t, s.addr, "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n"+token.TTLHeader+": 60\r\n\r\n")
		if status != 200 || time.Since(start) > 200*time.Millisecond {
			t.Errorf("an ordinary request during the slow clients: %d after %s", status, time.Since(start))
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
	if got := metricOf(t, s, "imds_proxy_connections_closed_without_request_total", "", ""); got < slow {
		t.Errorf("connections closed without a request counted %v, want at least %d", got, slow)
	}
}

// metricOf reads a counter of s's registry, optionally by one label.
func metricOf(t *testing.T, s *served, name, label, value string) float64 {
	t.Helper()
	families, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	total := 0.0
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			match := label == ""
			for _, lp := range m.GetLabel() {
				match = match || lp.GetName() == label && lp.GetValue() == value
			}
			if match {
				total += m.GetCounter().GetValue()
			}
		}
	}
	return total
}
