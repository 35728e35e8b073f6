package proxy_test

import (
	"bufio"
	"context"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// The fixture of the fuzz targets and benchmarks: a proxy in front of a fake
// IMDS on loopback, served by a real net/http server over in-memory pipes,
// so that one exchange costs microseconds and no listener but the fake
// upstream's is opened. (The tests against AEMM cover real IMDS behaviour.)

const (
	fakeSessionToken = "fake-upstream-session-token-AQAEAOkKx9"
	fakeBody         = "i-0123456789abcdef0"
	fakeServer       = "fake-imds" // the upstream's Server header, to tell its answers from the proxy's
)

// pipeCaller is the client address of every in-process connection.
var pipeCaller = netip.MustParseAddrPort("10.1.2.3:40000")

// seenRequest is what the fake upstream received.
type seenRequest struct {
	Method, Host, Path, RequestURI string
	Header                         http.Header
	ContentLength                  int64
	TransferEncoding               []string
	BodyBytes                      int64
}

// fakeUpstream answers token PUTs with fakeSessionToken (or, when it
// refuses tokens, 403: an IMDS without IMDSv2, which puts the proxy in
// IMDSv1 fallback) and anything else with fakeBody, and records every
// request when recording is on.
type fakeUpstream struct {
	srv          *httptest.Server
	addr         string
	refuseTokens bool
	recording    bool

	mu   sync.Mutex
	seen []seenRequest
}

func newFakeUpstream(tb testing.TB, refuseTokens, recording bool) *fakeUpstream {
	tb.Helper()
	u := &fakeUpstream{refuseTokens: refuseTokens, recording: recording}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u.recording {
			n, _ := io.Copy(io.Discard, r.Body)
			u.mu.Lock()
			u.seen = append(u.seen, seenRequest{Method: r.Method, Host: r.Host, Path: r.URL.Path, RequestURI: r.RequestURI,
				Header: r.Header.Clone(), ContentLength: r.ContentLength, TransferEncoding: r.TransferEncoding, BodyBytes: n})
			u.mu.Unlock()
		}
		w.Header().Set("Server", fakeServer)
		if r.Method == http.MethodPut && r.URL.Path == "/latest/api/token" {
			if u.refuseTokens {
				http.Error(w, "Forbidden", http.StatusForbidden)
				return
			}
			_, _ = io.WriteString(w, fakeSessionToken)
			return
		}
		_, _ = io.WriteString(w, fakeBody)
	}))
	u.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	u.addr = u.srv.Listener.Addr().String()
	tb.Cleanup(u.srv.Close)
	return u
}

// take returns what the upstream received since the last take.
func (u *fakeUpstream) take() []seenRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	seen := u.seen
	u.seen = nil
	return seen
}

// inProcess is a proxy in front of a fakeUpstream.
type inProcess struct {
	p        *proxy.Proxy
	minter   *token.Minter
	upstream *fakeUpstream
	ln       *pipeListener
	// sessionToken is what the proxy sends upstream as its token: "" in
	// IMDSv1 fallback.
	sessionToken string
}

// newInProcess starts a proxy with paths in front of a new fake upstream and
// waits until its upstream session is decided: IMDSv2, or IMDSv1 fallback
// when the upstream refuses tokens.
func newInProcess(tb testing.TB, paths proxy.PathPolicy, refuseTokens, recording bool) *inProcess {
	tb.Helper()
	upstream := newFakeUpstream(tb, refuseTokens, recording)
	cfg := testConfig(upstream.srv.URL)
	cfg.Paths = paths
	cfg.Cache = proxy.CacheConfig{} // every forwarded request reaches the upstream, once
	minter, err := token.NewRandomMinter()
	if err != nil {
		tb.Fatal(err)
	}
	p, err := proxy.New(cfg, zap.NewNop(), prometheus.NewRegistry(), minter)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go p.Run(ctx)
	ln := newPipeListener(pipeCaller)
	srv := &http.Server{Handler: p, ErrorLog: log.New(io.Discard, "", 0), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	tb.Cleanup(func() { _ = srv.Close(); cancel() })
	waitProxyReady(tb, p)
	upstream.take() // the session's own token request
	ip := &inProcess{p: p, minter: minter, upstream: upstream, ln: ln, sessionToken: fakeSessionToken}
	if refuseTokens {
		ip.sessionToken = ""
	}
	return ip
}

// exchange writes raw on a new connection and reads one response; method
// tells ReadResponse whether a body follows (HEAD).
func (ip *inProcess) exchange(raw, method string) (*http.Response, []byte, error) {
	c := ip.ln.dial()
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	written := make(chan struct{})
	go func() {
		defer close(written)
		_, _ = io.WriteString(c, raw) // fails once c is closed if the server stops reading
	}()
	defer func() { c.Close(); <-written }()
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: method})
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp, body, err
}

// pipeListener hands the server one end of an in-memory pipe per dial.
type pipeListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
	remote net.Addr
}

func newPipeListener(remote netip.AddrPort) *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), closed: make(chan struct{}), remote: net.TCPAddrFromAddrPort(remote)}
}

var pipeLocal = net.TCPAddrFromAddrPort(netip.MustParseAddrPort("169.254.169.254:80"))

func (l *pipeListener) dial() net.Conn {
	client, server := net.Pipe()
	select {
	case l.conns <- addrConn{Conn: server, local: pipeLocal, remote: l.remote}:
	case <-l.closed:
		server.Close()
	}
	return client
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeLocal }

// addrConn gives a pipe end TCP addresses, as the proxy binds tokens to the
// caller's address.
type addrConn struct {
	net.Conn
	local, remote net.Addr
}

func (c addrConn) LocalAddr() net.Addr  { return c.local }
func (c addrConn) RemoteAddr() net.Addr { return c.remote }
