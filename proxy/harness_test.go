package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// harness is the one proxy under test of the proxy's tests: in-process, with
// its own registry and logs, served on loopback by httptest unless an option
// says otherwise (servedAsTheBinary, overPipes).
type harness struct {
	t      testing.TB
	p      *proxy.Proxy
	cfg    proxy.Config // what it was started with
	minter *token.Minter
	reg    *prometheus.Registry
	logs   *observer.ObservedLogs
	addr   string        // where clients connect
	url    string        // http://addr
	pipe   *pipeListener // set when served over pipes, which clients dial instead of addr
	stop   func()        // stops serving and the proxy, and waits for both; idempotent, and run at cleanup
}

// harnessOption changes how startProxy configures, builds or serves a proxy.
type harnessOption func(*harnessSetup)

type harnessSetup struct {
	mutations    []func(*proxy.Config)
	minter       *token.Minter
	serve        func(h *harness) (stop func())
	logged       bool
	waitDecision bool
}

// configured changes the configuration testConfig gives.
func configured(mutate func(*proxy.Config)) harnessOption {
	return func(s *harnessSetup) { s.mutations = append(s.mutations, mutate) }
}

// withV1 sets the IMDSv1 policy (testConfig's is allow).
func withV1(policy imdsapi.V1Policy) harnessOption {
	return configured(func(c *proxy.Config) { c.V1 = policy })
}

// withPaths sets the path policy.
func withPaths(policy proxy.PathPolicy) harnessOption {
	return configured(func(c *proxy.Config) { c.Paths = policy })
}

// withMinter makes the proxy's tokens with m instead of a random minter.
func withMinter(m *token.Minter) harnessOption { return func(s *harnessSetup) { s.minter = m } }

// unlogged drops the proxy's logs: a fuzz target's or benchmark's millions of
// requests must not pile up in the observer.
func unlogged() harnessOption { return func(s *harnessSetup) { s.logged = false } }

// beforeSessionDecided returns without waiting until the proxy has decided
// its upstream session.
func beforeSessionDecided() harnessOption { return func(s *harnessSetup) { s.waitDecision = false } }

// servedAsTheBinary serves the proxy as the binary does, on proxy.Server
// with its limits, on a loopback listener; stop shuts it down gracefully,
// so that a test can check for leaked goroutines afterwards.
func servedAsTheBinary() harnessOption {
	return func(s *harnessSetup) { s.serve = serveAsTheBinary }
}

// testConfig is a configuration for tests: background retries are pushed out
// of the way so that each test controls when the upstream is contacted.
func testConfig(upstream string) proxy.Config {
	u, err := url.Parse(upstream)
	if err != nil {
		panic(err)
	}
	cfg := proxy.DefaultConfig()
	cfg.Upstream, cfg.V1 = u, imdsapi.V1Allow
	cfg.UpstreamTokenTimeout = 2 * time.Second
	cfg.UpstreamRetryMin, cfg.UpstreamRetryMax = time.Hour, time.Hour
	// Each test turns on the economy and limits it is about.
	cfg.Cache, cfg.Retry, cfg.Limits = proxy.CacheConfig{}, proxy.RetryConfig{}, proxy.ServerLimits{}
	return cfg
}

// cachingDefaults turns on the cache, as configured by default.
func cachingDefaults() harnessOption {
	return configured(func(c *proxy.Config) { c.Cache = proxy.DefaultCacheConfig() })
}

// economical turns on the cache, as cachingDefaults does, and quick retries.
func economical() harnessOption {
	quickRetries := configured(func(c *proxy.Config) {
		c.Retry = proxy.RetryConfig{Attempts: 3, BaseDelay: 5 * time.Millisecond, MaxDelay: 20 * time.Millisecond}
	})
	return func(s *harnessSetup) { cachingDefaults()(s); quickRetries(s) }
}

// startProxy starts a proxy with testConfig(upstream), changed by opts, and
// waits until its upstream session is decided.
func startProxy(tb testing.TB, upstream string, opts ...harnessOption) *harness {
	tb.Helper()
	setup := harnessSetup{serve: serveOnHTTPTest, logged: true, waitDecision: true}
	for _, opt := range opts {
		opt(&setup)
	}
	cfg := testConfig(upstream)
	for _, mutate := range setup.mutations {
		mutate(&cfg)
	}
	h := &harness{t: tb, cfg: cfg, minter: setup.minter, reg: prometheus.NewRegistry()}
	if h.minter == nil {
		var err error
		if h.minter, err = token.NewRandomMinter(); err != nil {
			tb.Fatal(err)
		}
	}
	logger := zap.NewNop()
	if setup.logged {
		var core zapcore.Core
		core, h.logs = observer.New(zap.DebugLevel)
		logger = zap.New(core)
	}
	p, err := proxy.New(cfg, logger, h.reg, h.minter)
	if err != nil {
		tb.Fatal(err)
	}
	h.p = p
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { p.Run(ctx); close(ran) }()
	stopRunning := func() { cancel(); <-ran }
	tb.Cleanup(stopRunning) // should serving fail to start
	stopServing := setup.serve(h)
	h.url = "http://" + h.addr
	h.stop = sync.OnceFunc(func() {
		stopServing()
		stopRunning()
	})
	tb.Cleanup(h.stop)
	if setup.waitDecision {
		h.waitReady()
	}
	return h
}

// serveOnHTTPTest serves h's proxy on a loopback httptest server, which fails
// the test on a handler panic.
func serveOnHTTPTest(h *harness) (stop func()) {
	srv := httptest.NewUnstartedServer(h.p)
	srv.Config.ErrorLog = log.New(panicFailer{h.t}, "", 0)
	srv.Start()
	h.addr = srv.Listener.Addr().String()
	return srv.Close
}

// discardLog drops what net/http logs on the servers of fixtures whose
// answers the tests check themselves.
var discardLog = log.New(io.Discard, "", 0)

// panicFailer fails the test when net/http reports a panic in a handler:
// it recovers them, and the proxy must not cause any.
type panicFailer struct{ t testing.TB }

func (f panicFailer) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("panic")) {
		f.t.Errorf("net/http: %s", p)
	}
	return len(p), nil
}

func serveAsTheBinary(h *harness) (stop func()) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		h.t.Fatal(err)
	}
	srv, limit := h.p.Server()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(limit(ln)) }()
	h.addr = ln.Addr().String()
	return func() {
		shutdownCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		if err := srv.Shutdown(shutdownCtx); err != nil {
			h.t.Errorf("shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			h.t.Errorf("serve: %v", err)
		}
	}
}

// waitReady waits until the proxy has decided its upstream session.
func (h *harness) waitReady() {
	h.t.Helper()
	if !eventually(10*time.Second, time.Millisecond, func() bool { return h.p.Ready() == nil }) {
		h.t.Fatal("proxy never decided its upstream session")
	}
}

// eventually checks cond every interval until it holds or within has
// passed, and says whether it held.
func eventually(within, interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
	return true
}

// dial opens a connection to the proxy from local (nil: any).
func (h *harness) dial(local net.Addr) (net.Conn, error) {
	if h.pipe != nil {
		if local != nil {
			return nil, fmt.Errorf("over pipes every connection comes from %s", h.pipe.remote)
		}
		return h.pipe.dial(), nil
	}
	return (&net.Dialer{LocalAddr: local, Timeout: 5 * time.Second}).Dial("tcp", h.addr)
}

// response is what a client got back.
type response struct {
	status int
	header http.Header
	body   string
}

func responseOf(resp *http.Response, body []byte) response {
	return response{status: resp.StatusCode, header: resp.Header, body: string(body)}
}

// send makes one request with client and reads the whole answer.
func send(client *http.Client, method, url string, header http.Header) (response, error) {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return response{}, err
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	resp, err := client.Do(req)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return responseOf(resp, body), err
}

// keepAliveClient is a client that keeps its connections open, as an SDK
// does; its user closes them.
func keepAliveClient() *http.Client {
	return &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 256}, Timeout: 20 * time.Second}
}

// do sends one request from 127.0.0.1 (over pipes, from their caller) with
// the given headers, on a connection of its own.
func (h *harness) do(method, path string, header http.Header) response {
	h.t.Helper()
	return h.doFrom(nil, method, path, header)
}

// doFrom sends one request from the given local address (nil: any).
func (h *harness) doFrom(local net.Addr, method, path string, header http.Header) response {
	h.t.Helper()
	client := &http.Client{
		Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true,
			DialContext: func(context.Context, string, string) (net.Conn, error) { return h.dial(local) }},
		Timeout: 20 * time.Second,
	}
	r, err := send(client, method, h.url+path, header)
	if err != nil {
		h.t.Fatalf("%s %s: %v", method, path, err)
	}
	return r
}

// token gets a fresh client token from the proxy.
func (h *harness) token() string {
	h.t.Helper()
	return h.tokenFrom(nil)
}

// tokenFrom gets a fresh client token for the caller at local.
func (h *harness) tokenFrom(local net.Addr) string {
	h.t.Helper()
	r := h.doFrom(local, http.MethodPut, imdsapi.TokenPath, http.Header{imdsapi.TokenTTLHeader: {"300"}})
	if r.status != http.StatusOK {
		h.t.Fatalf("token PUT from %v: status %d %q", local, r.status, r.body)
	}
	return r.body
}

// roundTrip writes request on c while it reads one response to it (to a
// HEAD, one without a body), giving up after 10 s. Writing goes on alongside
// reading, as the server may answer before it has read the whole request:
// over a pipe a write waits for the server to read. written is closed once
// the write is over, which closing c hastens.
func roundTrip(c net.Conn, request, method string) (resp *http.Response, body []byte, written <-chan struct{}, err error) {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	writing := make(chan struct{})
	go func() {
		defer close(writing)
		if request != "" {
			_, _ = io.WriteString(c, request) // fails if the server closes c without reading it all
		}
	}()
	resp, err = http.ReadResponse(bufio.NewReader(c), &http.Request{Method: method})
	if err != nil {
		return nil, nil, writing, err
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp, body, writing, err
}

// exchange writes raw on a new connection and reads one response; method
// tells whether a body follows (HEAD).
func (h *harness) exchange(raw, method string) (*http.Response, []byte, error) {
	return h.exchangeFrom(nil, raw, method)
}

// exchangeFrom is exchange from the given local address (nil: any).
func (h *harness) exchangeFrom(local net.Addr, raw, method string) (*http.Response, []byte, error) {
	c, err := h.dial(local)
	if err != nil {
		return nil, nil, err
	}
	resp, body, written, err := roundTrip(c, raw, method)
	c.Close()
	<-written
	return resp, body, err
}

// raw writes a hand-made request line and headers on a new connection and
// reads one response.
func (h *harness) raw(request string) response {
	h.t.Helper()
	return h.rawFrom(nil, request)
}

// rawFrom is raw from the given local address (nil: any).
func (h *harness) rawFrom(local net.Addr, request string) response {
	h.t.Helper()
	method, _, _ := strings.Cut(request, " ")
	resp, body, err := h.exchangeFrom(local, request, method)
	if err != nil {
		h.t.Fatalf("%.60q from %v: %v", request, local, err)
	}
	return responseOf(resp, body)
}

// exchangeOn writes request on the open connection c, reads one response,
// and leaves c open.
func exchangeOn(tb testing.TB, c net.Conn, request string) response {
	tb.Helper()
	method, _, _ := strings.Cut(request, " ")
	resp, body, written, err := roundTrip(c, request, method)
	<-written
	_ = c.SetDeadline(time.Time{})
	if err != nil {
		tb.Fatalf("%.60q on a connection from %s: %v", request, c.LocalAddr(), err)
	}
	return responseOf(resp, body)
}

// readResponse reads one response, to a request already written, from c.
func readResponse(tb testing.TB, c net.Conn) response {
	tb.Helper()
	return exchangeOn(tb, c, "")
}

// loopbackAddr is a local address to send from, to be another caller than
// 127.0.0.1.
func loopbackAddr(ip string) net.Addr { return &net.TCPAddr{IP: net.ParseIP(ip)} }

// metric returns the sum of the counters and gauges name whose labels include
// labels.
func (h *harness) metric(name string, labels map[string]string) float64 {
	h.t.Helper()
	families, err := h.reg.Gather()
	if err != nil {
		h.t.Fatal(err)
	}
	total := 0.0
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			for _, lp := range m.GetLabel() {
				if want, ok := labels[lp.GetName()]; ok && want != lp.GetValue() {
					continue next
				}
			}
			total += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return total
}

// logsContaining returns the logged entries whose message contains s.
func (h *harness) logsContaining(s string) []observer.LoggedEntry {
	return h.logs.FilterMessageSnippet(s).All()
}

// assertNoSecretsLogged fails if any log field or message contains one of secrets.
func (h *harness) assertNoSecretsLogged(secrets ...string) {
	h.t.Helper()
	for _, e := range h.logs.All() {
		text := e.Message
		for k, v := range e.ContextMap() {
			text += fmt.Sprintf(" %s=%v", k, v)
		}
		for _, s := range secrets {
			if s != "" && strings.Contains(text, s) {
				h.t.Errorf("log entry %q contains a secret", e.Message)
			}
		}
	}
}
