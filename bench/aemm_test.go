package bench

import (
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// aemmGuard sits between the tap and amazon-ec2-metadata-mock and never lets
// a token PUT run beside another request: AEMM v1.13.0 keeps its tokens in
// a plain map and dies ("fatal error: concurrent map writes" in
// imdsv2.GenerateToken) under concurrent token PUTs, which a burst of SDK
// clients going straight to it produces. GETs still run in parallel. It
// forwards requests as they are, adding nothing.
type aemmGuard struct {
	Addr      string
	target    string
	transport *http.Transport
	mu        sync.RWMutex
}

func startAEMMGuard(t testing.TB, target string) *aemmGuard {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &aemmGuard{Addr: ln.Addr().String(), target: target,
		transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 256, DisableCompression: true}}
	srv := &http.Server{Handler: g, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close(); g.transport.CloseIdleConnections() })
	return g
}

func (g *aemmGuard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPut {
		g.mu.Lock()
		defer g.mu.Unlock()
	} else {
		g.mu.RLock()
		defer g.mu.RUnlock()
	}
	out, err := http.NewRequestWithContext(r.Context(), r.Method, "http://"+g.target+r.URL.RequestURI(), nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	out.Header = r.Header.Clone()
	resp, err := g.transport.RoundTrip(out)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
}

// startCountedAEMM runs AEMM behind its guard, with a tap in front that
// counts what reaches it: point clients (or the proxy) at the tap.
func startCountedAEMM(t testing.TB) *testutil.Tap {
	t.Helper()
	// Role credentials that expire in six hours, as IMDS's do: a proxy does not cache expired ones.
	aemm := testutil.StartAEMM(t, testutil.AEMMCredentialsExpiring(t, time.Now().Add(6*time.Hour))...)
	return testutil.NewTap(t, startAEMMGuard(t, aemm.Addr).Addr)
}
