package testutil

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"
)

// SeenRequest is one request as it crossed the wire.
type SeenRequest struct {
	Method, Path, Host string
	Header             http.Header
}

// Tap is a TCP relay in front of a server that records every HTTP request
// passing through it, exactly as the client sent it. A test points the proxy's
// upstream at the tap to see what the upstream received. A tap with no target
// is a trap: it records and answers nothing, to prove nothing reached it.
type Tap struct {
	ln     net.Listener
	target string
	delay  time.Duration

	mu       sync.Mutex
	conns    int
	requests []SeenRequest
}

// NewTap starts a tap on a free loopback port relaying to target (host:port),
// or a trap when target is empty.
func NewTap(t testing.TB, target string) *Tap {
	t.Helper()
	return NewDelayingTap(t, target, 0)
}

// NewDelayingTap is a tap that holds each request for delay before passing
// it on: a slow upstream with the real server behind it.
func NewDelayingTap(t testing.TB, target string, delay time.Duration) *Tap {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tap := &Tap{ln: ln, target: target, delay: delay}
	go tap.accept()
	t.Cleanup(func() { ln.Close() })
	return tap
}

// Addr is the tap's host:port; URL is http://Addr.
func (tap *Tap) Addr() string { return tap.ln.Addr().String() }

// URL is http://Addr.
func (tap *Tap) URL() string { return "http://" + tap.Addr() }

// Conns is how many connections the tap has accepted.
func (tap *Tap) Conns() int {
	tap.mu.Lock()
	defer tap.mu.Unlock()
	return tap.conns
}

// Requests returns a copy of the requests recorded so far.
func (tap *Tap) Requests() []SeenRequest {
	tap.mu.Lock()
	defer tap.mu.Unlock()
	return append([]SeenRequest(nil), tap.requests...)
}

// WaitRequests waits until the tap has recorded at least n requests.
func (tap *Tap) WaitRequests(n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for len(tap.Requests()) < n {
		if time.Now().After(deadline) {
			return fmt.Errorf("tap saw %d requests within %s, want %d", len(tap.Requests()), timeout, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

func (tap *Tap) accept() {
	for {
		c, err := tap.ln.Accept()
		if err != nil {
			return
		}
		tap.mu.Lock()
		tap.conns++
		tap.mu.Unlock()
		go tap.relay(c)
	}
}

// relay records each request before forwarding its bytes, so that by the
// time the server can answer, the request is in Requests.
func (tap *Tap) relay(client net.Conn) {
	defer client.Close()
	var server net.Conn
	if tap.target != "" {
		var err error
		if server, err = net.Dial("tcp", tap.target); err != nil {
			return
		}
		defer server.Close()
		go func() {
			_, _ = io.Copy(client, server)
			client.Close() // the server went away: so does this connection, as on a real path
		}()
	}
	rec := &recordingReader{r: client}
	br := bufio.NewReader(rec)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, req.Body)
		tap.mu.Lock()
		tap.requests = append(tap.requests, SeenRequest{Method: req.Method, Path: req.URL.Path, Host: req.Host, Header: req.Header})
		tap.mu.Unlock()
		if server == nil {
			continue
		}
		time.Sleep(tap.delay)
		if _, err := server.Write(rec.take(br.Buffered())); err != nil {
			return
		}
	}
}

// recordingReader keeps every byte read through it until take is called, so
// the relay forwards exactly the bytes of the requests it has parsed.
type recordingReader struct {
	r   io.Reader
	buf []byte
}

func (rr *recordingReader) Read(p []byte) (int, error) {
	n, err := rr.r.Read(p)
	rr.buf = append(rr.buf, p[:n]...)
	return n, err
}

// take returns the bytes of the requests parsed so far: everything read
// less the unparsed remainder that bufio still buffers, which is kept for the
// next call.
func (rr *recordingReader) take(buffered int) []byte {
	n := len(rr.buf) - buffered
	out := append([]byte(nil), rr.buf[:n]...)
	rr.buf = append(rr.buf[:0], rr.buf[n:]...)
	return out
}
