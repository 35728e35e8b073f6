package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// harness is one proxy under test, served on loopback by httptest.
type harness struct {
	t    *testing.T
	p    *proxy.Proxy
	srv  *httptest.Server
	reg  *prometheus.Registry
	logs *observer.ObservedLogs
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

// startProxy starts a proxy with cfg and minter (nil: a random one) and waits
// until its upstream session is decided.
func startProxy(t *testing.T, cfg proxy.Config, minter *token.Minter) *harness {
	t.Helper()
	if minter == nil {
		var err error
		if minter, err = token.NewRandomMinter(); err != nil {
			t.Fatal(err)
		}
	}
	core, logs := observer.New(zap.DebugLevel)
	reg := prometheus.NewRegistry()
	p, err := proxy.New(cfg, zap.New(core), reg, minter)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go p.Run(ctx)
	srv := httptest.NewUnstartedServer(p)
	srv.Config.ErrorLog = log.New(panicFailer{t}, "", 0)
	srv.Start()
	t.Cleanup(func() { srv.Close(); cancel() })
	h := &harness{t: t, p: p, srv: srv, reg: reg, logs: logs}
	waitProxyReady(t, p)
	return h
}

// panicFailer fails the test when net/http reports a panic in a handler:
// it recovers them, and the proxy must not cause any.
type panicFailer struct{ t *testing.T }

func (f panicFailer) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("panic")) {
		f.t.Errorf("net/http: %s", p)
	}
	return len(p), nil
}

// waitProxyReady waits until p has decided its upstream session.
func waitProxyReady(tb testing.TB, p *proxy.Proxy) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.Ready() != nil {
		if time.Now().After(deadline) {
			tb.Fatal("proxy never decided its upstream session")
		}
		time.Sleep(time.Millisecond)
	}
}

// response is what a client got back.
type response struct {
	status int
	header http.Header
	body   string
}

// do sends one request from 127.0.0.1 with the given headers.
func (h *harness) do(method, path string, header http.Header) response {
	h.t.Helper()
	return h.doFrom(nil, method, path, header)
}

// doFrom sends one request from the given local address (nil: any).
func (h *harness) doFrom(local net.Addr, method, path string, header http.Header) response {
	h.t.Helper()
	req, err := http.NewRequest(method, h.srv.URL+path, nil)
	if err != nil {
		h.t.Fatal(err)
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	dialer := &net.Dialer{LocalAddr: local, Timeout: 5 * time.Second}
	client := &http.Client{
		Transport: &http.Transport{Proxy: nil, DialContext: dialer.DialContext, DisableKeepAlives: true},
		Timeout:   20 * time.Second,
	}
	resp, err := client.Do(req)
	if err != nil {
		h.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, header: resp.Header, body: string(body)}
}

// raw writes a hand-made request line and headers and reads one response.
func (h *harness) raw(request string) response {
	h.t.Helper()
	return rawResponse(h.t, nil, h.srv.Listener.Addr().String(), request)
}

// rawResponse writes request on a new connection from local (nil: any) to addr and reads one response.
func rawResponse(t *testing.T, local net.Addr, addr, request string) response {
	t.Helper()
	c, err := (&net.Dialer{LocalAddr: local}).Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading response to %.60q: %v", request, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, header: resp.Header, body: string(body)}
}

// token gets a fresh client token from the proxy.
func (h *harness) token() string {
	h.t.Helper()
	r := h.do(http.MethodPut, "/latest/api/token", http.Header{imdsapi.TokenTTLHeader: {"300"}})
	if r.status != http.StatusOK {
		h.t.Fatalf("token PUT: status %d %q", r.status, r.body)
	}
	return r.body
}

// metric returns the value of the counter or gauge name with the given labels.
func (h *harness) metric(name string, labels map[string]string) float64 {
	h.t.Helper()
	return gatherValue(h.t, h.reg, name, labels)
}

func gatherValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
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
