package proxy_test

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// The one fake IMDS of the proxy's tests, for what the real IMDS (AEMM) does
// only under load or failure, and for the fuzz target and benchmarks, which
// need an upstream that costs microseconds.

const (
	fakeSessionToken = "fake-upstream-session-token-AQAEAOkKx9"
	fakeBody         = "i-0123456789abcdef0"
	fakeServer       = "fake-imds" // the fake's Server header, to tell its answers from the proxy's
)

// seenRequest is what the fake IMDS received.
type seenRequest struct {
	Method, Host, Path, RequestURI string
	Header                         http.Header
	ContentLength                  int64
	TransferEncoding               []string
	BodyBytes                      int64
}

// fault is how the fake IMDS fails the metadata requests it receives. Token
// PUTs are answered in every mode but refuse, so that the proxy's session
// itself stays up unless the link is down.
type fault int32

const (
	healthy     fault = iota // answer
	refuse                   // listener closed: connection refused
	hang                     // read the request, never answer
	resetBody                // headers and half the body, then a reset
	garbage                  // bytes that are not HTTP
	unauthorize              // 401, as IMDS answers a token it no longer knows
)

// fakeIMDS is an IMDS on loopback that a test scripts. By default it issues
// fakeSessionToken to token PUTs and answers every other request 200 with
// fakeBody; its 200 answers go through http.ServeContent, which honours Range
// and conditional headers as an HTTP server may, so a client header that
// reaches it can change its answer. It counts the requests of each path.
type fakeIMDS struct {
	tb        testing.TB
	url, addr string

	tokens         tokenAnswer
	tokensRequired bool
	recording      bool
	numbered       bool
	status         func(path string, n int) int
	holdPrefix     string
	release        <-chan struct{}
	relay          *httputil.ReverseProxy

	srv      *httptest.Server
	ln       *downableListener
	mode     atomic.Int32 // a fault
	stopping chan struct{}
	stopOnce sync.Once

	mu      sync.Mutex
	perPath map[string]int
	seen    []seenRequest
}

// tokenAnswer is how the fake IMDS answers token PUTs.
type tokenAnswer int

const (
	issueTokens  tokenAnswer = iota // fakeSessionToken
	refuseTokens                    // 403: an IMDS without IMDSv2, which puts the proxy in IMDSv1 fallback
	stallTokens                     // never: what a process behind the hop limit sees
)

// fakeOption scripts a fakeIMDS.
type fakeOption func(*fakeIMDS)

// answeringTokens sets how token PUTs are answered.
func answeringTokens(a tokenAnswer) fakeOption { return func(f *fakeIMDS) { f.tokens = a } }

// requiringTokens answers 401 to a metadata request without the session
// token, as IMDS with HttpTokens=required does.
func requiringTokens() fakeOption { return func(f *fakeIMDS) { f.tokensRequired = true } }

// recording keeps every request for take.
func recording() fakeOption { return func(f *fakeIMDS) { f.recording = true } }

// numberedAnswers answers "answer <path> #<n>" for the nth request of path
// instead of fakeBody, so that a test can tell fetches apart.
func numberedAnswers() fakeOption { return func(f *fakeIMDS) { f.numbered = true } }

// answeringStatus gives the status of the nth request of path (from 1).
func answeringStatus(status func(path string, n int) int) fakeOption {
	return func(f *fakeIMDS) { f.status = status }
}

// holding keeps metadata requests under prefix waiting until release is
// closed (or the request ends).
func holding(prefix string, release <-chan struct{}) fakeOption {
	return func(f *fakeIMDS) { f.holdPrefix, f.release = prefix, release }
}

// inFrontOf passes every request it does not fail on to the server at addr
// (host:port), a real IMDS.
func inFrontOf(addr string) fakeOption {
	return func(f *fakeIMDS) {
		f.relay = &httputil.ReverseProxy{
			Rewrite: func(r *httputil.ProxyRequest) {
				r.SetURL(&url.URL{Scheme: "http", Host: addr})
				r.Out.Host = r.In.Host
			},
			Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true},
			ErrorLog:  discardLog,
		}
	}
}

// newFakeIMDS starts a fake IMDS on loopback, closed when the test ends.
func newFakeIMDS(tb testing.TB, opts ...fakeOption) *fakeIMDS {
	tb.Helper()
	f := &fakeIMDS{tb: tb, perPath: map[string]int{}, stopping: make(chan struct{})}
	for _, opt := range opts {
		opt(f)
	}
	ln, err := listenDownable("127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	f.ln = ln
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.srv.Listener = ln
	f.srv.Config.ErrorLog = discardLog
	f.srv.Start()
	f.url, f.addr = f.srv.URL, ln.Addr().String()
	tb.Cleanup(f.close)
	return f
}

// close stops the fake and waits until every request it holds has ended;
// a test checking for leaked goroutines calls it first.
func (f *fakeIMDS) close() {
	f.stopOnce.Do(func() {
		close(f.stopping)
		f.srv.CloseClientConnections()
		f.srv.Close()
	})
}

// fail switches how metadata requests fail from now on: refuse takes the
// listener down and closes every open connection, healthy brings it back at
// the same address.
func (f *fakeIMDS) fail(m fault) {
	old := fault(f.mode.Swap(int32(m)))
	switch {
	case m == refuse && old != refuse:
		f.ln.down()
		f.srv.CloseClientConnections()
	case m != refuse && old == refuse:
		if err := f.ln.up(); err != nil {
			f.tb.Errorf("fake IMDS re-listening on %s: %v", f.addr, err)
		}
	}
}

// count says how many requests of path the fake has received.
func (f *fakeIMDS) count(path string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.perPath[path]
}

// take returns what the fake received since the last take (recording only).
func (f *fakeIMDS) take() []seenRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	seen := f.seen
	f.seen = nil
	return seen
}

func (f *fakeIMDS) serve(w http.ResponseWriter, r *http.Request) {
	n := f.note(r)
	if r.Method != http.MethodPut && f.failed(w, r) {
		return
	}
	if f.relay != nil {
		f.relay.ServeHTTP(w, r)
		return
	}
	w.Header().Set("Server", fakeServer)
	if r.Method == http.MethodPut && r.URL.Path == imdsapi.TokenPath {
		f.answerToken(w, r)
		return
	}
	if f.tokensRequired && r.Header.Get(imdsapi.TokenHeader) != fakeSessionToken {
		http.Error(w, "", http.StatusUnauthorized)
		return
	}
	if f.release != nil && strings.HasPrefix(r.URL.Path, f.holdPrefix) {
		f.wait(r, f.release)
	}
	status, body := http.StatusOK, fakeBody
	if f.status != nil {
		status = f.status(r.URL.Path, n)
	}
	if f.numbered {
		body = "answer " + r.URL.Path + " #" + string(rune('0'+n%10))
	}
	if status == http.StatusOK {
		http.ServeContent(w, r, "", time.Time{}, strings.NewReader(body))
		return
	}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

// note counts r and records it when recording, and says how many requests
// of its path there have been.
func (f *fakeIMDS) note(r *http.Request) int {
	var seen seenRequest
	if f.recording {
		n, _ := io.Copy(io.Discard, r.Body)
		seen = seenRequest{Method: r.Method, Host: r.Host, Path: r.URL.Path, RequestURI: r.RequestURI,
			Header: r.Header.Clone(), ContentLength: r.ContentLength, TransferEncoding: r.TransferEncoding, BodyBytes: n}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.recording {
		f.seen = append(f.seen, seen)
	}
	f.perPath[r.URL.Path]++
	return f.perPath[r.URL.Path]
}

func (f *fakeIMDS) answerToken(w http.ResponseWriter, r *http.Request) {
	switch f.tokens {
	case refuseTokens:
		http.Error(w, "Forbidden", http.StatusForbidden)
	case stallTokens:
		f.wait(r, nil)
	default:
		w.Header().Set(imdsapi.TokenTTLHeader, r.Header.Get(imdsapi.TokenTTLHeader))
		_, _ = io.WriteString(w, fakeSessionToken)
	}
}

// failed answers r as the current fault says, and reports whether it did.
func (f *fakeIMDS) failed(w http.ResponseWriter, r *http.Request) bool {
	switch fault(f.mode.Load()) {
	case hang:
		f.wait(r, nil)
	case resetBody:
		f.hijacked(w, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf an an", true)
	case garbage:
		f.hijacked(w, "SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 not http at all\r\n\r\n", false)
	case unauthorize:
		w.WriteHeader(http.StatusUnauthorized)
	default:
		return false
	}
	return true
}

// wait blocks until release is closed (nil: never), r ends or the fake stops.
func (f *fakeIMDS) wait(r *http.Request, release <-chan struct{}) {
	select {
	case <-release:
	case <-r.Context().Done():
	case <-f.stopping:
	}
}

// hijacked writes raw bytes on the request's connection and closes it, with
// a reset rather than a clean close when reset is set.
func (f *fakeIMDS) hijacked(w http.ResponseWriter, raw string, reset bool) {
	c, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		f.tb.Errorf("fake IMDS: %v", err)
		return
	}
	defer c.Close()
	_, _ = io.WriteString(c, raw)
	if reset {
		_ = c.(*net.TCPConn).SetLinger(0)
	}
}

// downableListener is a loopback listener that can be taken down, so that
// dials are refused, and brought back up at the same address; Accept waits
// meanwhile rather than fail, so that the server on it keeps serving.
type downableListener struct {
	bound  net.Addr // where it listens, down or up
	closed chan struct{}
	once   sync.Once

	mu     sync.Mutex
	ln     net.Listener  // nil while down
	raised chan struct{} // closed when the listener is brought back up
}

func listenDownable(addr string) (*downableListener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return &downableListener{bound: ln.Addr(), ln: ln, closed: make(chan struct{})}, nil
}

func (l *downableListener) Accept() (net.Conn, error) {
	for {
		l.mu.Lock()
		ln, raised := l.ln, l.raised
		l.mu.Unlock()
		if ln == nil {
			select {
			case <-raised:
				continue
			case <-l.closed:
				return nil, net.ErrClosed
			}
		}
		c, err := ln.Accept()
		if err == nil {
			return c, nil
		}
		select {
		case <-l.closed:
			return nil, err
		default:
		}
		l.mu.Lock()
		wasDowned := l.ln != ln
		l.mu.Unlock()
		if !wasDowned {
			return nil, err
		}
	}
}

func (l *downableListener) down() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ln != nil {
		l.ln.Close()
		l.ln, l.raised = nil, make(chan struct{})
	}
}

func (l *downableListener) up() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ln != nil {
		return nil
	}
	ln, err := net.Listen("tcp", l.bound.String())
	if err != nil {
		return err
	}
	l.ln = ln
	close(l.raised)
	return nil
}

func (l *downableListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ln != nil {
		return l.ln.Close()
	}
	return nil
}

func (l *downableListener) Addr() net.Addr { return l.bound }
