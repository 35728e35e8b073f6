package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// TestRetryCause: what is worth another attempt. Refused, reset and cut
// connections are; hangs, garbage, oversized answers, the proxy's own
// answers and a chained proxy's answers are not.
func TestRetryCause(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, refused := net.DialTimeout("tcp", addr, time.Second) // a real "connection refused"
	reset := &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	timeout := &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}
	answer := func(status int, h http.Header) *upstreamAnswer {
		return &upstreamAnswer{status: status, header: h}
	}
	cases := []struct {
		name string
		resp *upstreamAnswer
		err  error
		want string
	}{
		{"refused", nil, fmt.Errorf("dial: %w", refused), "connection"},
		{"reset", nil, reset, "connection"},
		{"cut mid-body", nil, io.ErrUnexpectedEOF, "connection"},
		{"closed before answering", nil, io.EOF, "connection"},
		{"timeout", nil, timeout, ""},
		{"deadline", nil, context.DeadlineExceeded, ""},
		{"garbage", nil, errors.New(`net/http: malformed HTTP response "SSH-2.0"`), ""},
		{"too large", nil, errTooLarge, ""},
		{"429", answer(429, http.Header{}), nil, "throttled"},
		{"503", answer(503, http.Header{}), nil, "server_error"},
		{"508 loop", answer(508, http.Header{}), nil, ""},
		{"404", answer(404, http.Header{}), nil, ""},
		{"chained proxy's 429", answer(429, http.Header{imdsapi.ProxyHeader: {"node"}}), nil, ""},
		{"own 503", nil, noSession(), ""},
		{"own 503, wrapped", nil, fmt.Errorf("x: %w", noSession()), ""},
	}
	for _, c := range cases {
		if got := retryCause(c.resp, c.err); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
