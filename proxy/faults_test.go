package proxy_test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// fault is how the faulty front answers a metadata GET.
type fault int

const (
	healthy     fault = iota // relay to the real upstream
	refuse                   // listener closed: connection refused
	hang                     // read the request, never answer
	resetBody                // headers and half the body, then a reset
	garbage                  // bytes that are not HTTP
	unauthorize              // 401, as IMDS answers a token it no longer knows
)

// faultyFront sits between the proxy and a healthy upstream and fails the
// way a test says. Token PUTs pass through in every mode but refuse, so
// that the proxy's session itself stays up unless the link is down.
type faultyFront struct {
	t        *testing.T
	addr     string
	upstream string
	mode     atomic.Int32
	mu       sync.Mutex
	ln       net.Listener
	open     map[net.Conn]struct{}
	conns    sync.WaitGroup
	stopping chan struct{}
}

func newFaultyFront(t *testing.T, upstream string) *faultyFront {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &faultyFront{t: t, addr: ln.Addr().String(), upstream: upstream, stopping: make(chan struct{}), open: map[net.Conn]struct{}{}}
	f.listen(ln)
	return f
}

func (f *faultyFront) listen(ln net.Listener) {
	f.mu.Lock()
	f.ln = ln
	f.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.open[c] = struct{}{}
			f.mu.Unlock()
			f.conns.Add(1)
			go func() {
				defer f.conns.Done()
				f.serve(c)
				f.mu.Lock()
				delete(f.open, c)
				f.mu.Unlock()
			}()
		}
	}()
}

// set switches the mode; refuse closes the listener and every open
// connection, leaving it re-opens the listener.
func (f *faultyFront) set(m fault) {
	old := fault(f.mode.Swap(int32(m)))
	switch {
	case m == refuse && old != refuse:
		f.mu.Lock()
		f.ln.Close()
		for c := range f.open {
			c.Close()
		}
		f.mu.Unlock()
	case m != refuse && old == refuse:
		ln, err := net.Listen("tcp", f.addr)
		if err != nil {
			f.t.Fatalf("re-listening on %s: %v", f.addr, err)
		}
		f.listen(ln)
	}
}

func (f *faultyFront) close() {
	close(f.stopping)
	f.mu.Lock()
	f.ln.Close()
	for c := range f.open {
		c.Close()
	}
	f.mu.Unlock()
	f.conns.Wait()
}

func (f *faultyFront) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		mode := fault(f.mode.Load())
		if req.Method == http.MethodPut {
			mode = healthy
		}
		switch mode {
		case hang:
			select {
			case <-f.stopping:
			case <-time.After(10 * time.Second):
			}
			return
		case resetBody:
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf an an")
			c.(*net.TCPConn).SetLinger(0)
			return
		case garbage:
			io.WriteString(c, "SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 not http at all\r\n\r\n")
			return
		case unauthorize:
			io.WriteString(c, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
			continue
		}
		if !f.relay(c, req) {
			return
		}
	}
}

// relay forwards one request to the upstream over a fresh connection.
func (f *faultyFront) relay(c net.Conn, req *http.Request) bool {
	up, err := net.Dial("tcp", f.upstream)
	if err != nil {
		return false
	}
	defer up.Close()
	req.Header.Set("Connection", "close")
	if err := req.Write(up); err != nil {
		return false
	}
	resp, err := http.ReadResponse(bufio.NewReader(up), req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	resp.Close = false
	return resp.Write(c) == nil
}

// TestUpstreamFaults: for each way the upstream can fail, the client gets
// the right status within the documented bound (--upstream-response-timeout
// for a hang, at once otherwise), and the proxy serves normally again, on
// its own, soon after the upstream is healthy. Nothing leaks goroutines.
func TestUpstreamFaults(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	up := newScriptedIMDS(t, func(string, int) int { return 200 })
	defer up.srv.Close()
	front := newFaultyFront(t, strings.TrimPrefix(up.srv.URL, "http://"))
	defer front.close()
	cfg := testConfig("http://" + front.addr)
	cfg.UpstreamResponseTimeout, cfg.UpstreamDialTimeout = 300*time.Millisecond, 200*time.Millisecond
	cfg.UpstreamRetryMin, cfg.UpstreamRetryMax = 50*time.Millisecond, 200*time.Millisecond
	cfg.Retry = proxy.RetryConfig{Attempts: 3, BaseDelay: 10 * time.Millisecond, MaxDelay: 50 * time.Millisecond}
	s := serveProxy(t, cfg)
	defer s.stop()
	auth := http.Header{imdsapi.TokenHeader: {s.token(t)}}
	// The documented worst case: every attempt waits out the dial and the
	// response timeouts, plus the backoff between attempts.
	s.worst = time.Duration(cfg.Retry.Attempts)*(cfg.UpstreamDialTimeout+cfg.UpstreamResponseTimeout) + 2*cfg.Retry.MaxDelay

	cases := []struct {
		fault  fault
		name   string
		status []int
		within time.Duration
	}{
		{refuse, "refuses", []int{502}, s.worst},
		{hang, "hangs", []int{504}, s.worst},
		{resetBody, "resets mid-body", []int{502}, s.worst},
		{garbage, "answers garbage", []int{502}, s.worst},
		{unauthorize, "401s a valid session token", []int{502}, s.worst},
	}
	for i, c := range cases {
		front.set(c.fault)
		path := "/latest/meta-data/fault-" + string(rune('a'+i)) // a new path each time: nothing cached
		status, took := s.get(t, path, auth)
		if !contains(c.status, status) || took > c.within {
			t.Errorf("upstream %s: client got %d after %s, want %v within %s", c.name, status, took, c.status, c.within)
		}
		front.set(healthy)
		if recovered := s.recovers(t, path+"-after", auth, 3*time.Second); !recovered {
			t.Errorf("after the upstream %s, the proxy did not serve again within 3s", c.name)
		}
	}
	s.flap(t, front, auth)
}

// recovers polls until a GET succeeds or the time is up.
func (s *served) recovers(t *testing.T, path string, auth http.Header, within time.Duration) bool {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if status, _ := s.get(t, path, auth); status == 200 {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return false
}

// flap switches the upstream between refusing and healthy every 30 ms for a
// second while a client keeps asking: every answer is a success or a clean
// gateway error, never a hang, and the proxy serves once it settles.
func (s *served) flap(t *testing.T, front *faultyFront, auth http.Header) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 33; i++ {
			front.set([]fault{refuse, healthy}[i%2])
			time.Sleep(30 * time.Millisecond)
		}
		front.set(healthy)
	}()
	statuses := map[int]int{}
	for i := 0; ; i++ {
		select {
		case <-done:
			t.Logf("while flapping: %v", statuses)
			if !s.recovers(t, "/latest/meta-data/after-flapping", auth, 3*time.Second) {
				t.Error("after flapping the proxy did not serve again within 3s")
			}
			return
		default:
		}
		status, took := s.get(t, "/latest/meta-data/flap-"+string(rune('a'+i%26)), auth)
		statuses[status]++
		if !contains([]int{200, 502, 503, 504}, status) || took > s.worst {
			t.Errorf("while flapping: %d after %s", status, took)
		}
	}
}

func contains(list []int, v int) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}
