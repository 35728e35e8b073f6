package proxy_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// served is a proxy behind its own server (proxy.Server, with the limits),
// as the binary runs it, that a test stops explicitly so that it can check
// for leaked goroutines afterwards.
type served struct {
	p      *proxy.Proxy
	addr   string
	reg    *prometheus.Registry
	client *http.Client
	stop   func()
	worst  time.Duration // the longest a client may wait, where a test sets it
}

func serveProxy(t *testing.T, cfg proxy.Config) *served {
	t.Helper()
	minter, err := token.NewRandomMinter()
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	p, err := proxy.New(cfg, zap.NewNop(), reg, minter)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv, limit := p.Server()
	ctx, cancel := context.WithCancel(context.Background())
	sessionDone, serveDone := make(chan struct{}), make(chan error, 1)
	go func() { p.Run(ctx); close(sessionDone) }()
	go func() { serveDone <- srv.Serve(limit(ln)) }()
	transport := &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 64}
	s := &served{p: p, addr: ln.Addr().String(), reg: reg, client: &http.Client{Transport: transport, Timeout: 20 * time.Second}}
	s.stop = func() {
		transport.CloseIdleConnections()
		shutdownCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		if err := srv.Shutdown(shutdownCtx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-serveDone; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serve: %v", err)
		}
		cancel()
		<-sessionDone
	}
	waitProxyReady(t, p)
	return s
}

// get sends one request and returns the status and how long it took.
func (s *served) get(t *testing.T, path string, header http.Header) (int, time.Duration) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+s.addr+path, nil)
	for k, v := range header {
		req.Header[k] = v
	}
	start := time.Now()
	resp, err := s.client.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	_, _ = readBody(resp)
	return resp.StatusCode, time.Since(start)
}

func (s *served) token(t *testing.T) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, "http://"+s.addr+"/latest/api/token", nil)
	req.Header.Set(imdsapi.TokenTTLHeader, "300")
	resp, err := s.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := readBody(resp)
	if resp.StatusCode != 200 {
		t.Fatalf("token PUT: %d", resp.StatusCode)
	}
	return body
}

func readBody(resp *http.Response) (string, error) {
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
