package proxy_test

import (
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/proxy"
)

// Serving over in-memory pipes: a real net/http server whose connections
// cost no socket, so that one exchange costs microseconds, with a caller
// address of the test's choosing.

// pipeCaller is the client address of every in-process connection.
var pipeCaller = netip.MustParseAddrPort("10.1.2.3:40000")

// overPipes serves the proxy on a net/http server over in-memory pipes,
// each from caller; the harness's clients dial the pipes.
func overPipes(caller netip.AddrPort) harnessOption {
	return func(s *harnessSetup) {
		s.serve = func(h *harness) (stop func()) {
			h.pipe = newPipeListener(caller)
			h.addr = pipeLocal.String()
			srv := &http.Server{Handler: h.p, ErrorLog: discardLog, ReadHeaderTimeout: 10 * time.Second}
			go func() { _ = srv.Serve(h.pipe) }()
			return func() { _ = srv.Close() }
		}
	}
}

// inProcess is the fixture of FuzzServeHTTP: a proxy over pipes in front of a
// fake IMDS.
type inProcess struct {
	*harness
	upstream *fakeIMDS
	// sessionToken is what the proxy sends upstream as its token: "" in
	// IMDSv1 fallback.
	sessionToken string
}

// newInProcess starts a proxy with paths over pipes from pipeCaller, in front
// of a new fake IMDS that records what it receives when keepRequests is set,
// and waits until its upstream session is decided: IMDSv2, or IMDSv1 fallback
// when noIMDSv2 makes the fake refuse tokens.
func newInProcess(tb testing.TB, paths proxy.PathPolicy, noIMDSv2, keepRequests bool) *inProcess {
	tb.Helper()
	opts := []fakeOption{}
	if noIMDSv2 {
		opts = append(opts, answeringTokens(refuseTokens))
	}
	if keepRequests {
		opts = append(opts, recording())
	}
	upstream := newFakeIMDS(tb, opts...)
	h := startProxy(tb, upstream.url, overPipes(pipeCaller), unlogged(), withPaths(paths))
	upstream.take() // the session's own token request
	ip := &inProcess{harness: h, upstream: upstream, sessionToken: fakeSessionToken}
	if noIMDSv2 {
		ip.sessionToken = ""
	}
	return ip
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
