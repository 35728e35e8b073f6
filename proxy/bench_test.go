package proxy_test

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"sync/atomic"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// The paths SDKs and agents ask for, with a few hostile spellings; the
// realistic policy (paths_fuzz_test.go) denies user-data and credentials.
var benchPaths = []string{
	"/latest/meta-data/iam/security-credentials/",
	"/latest/meta-data/iam/security-credentials/my-app-role",
	"/latest/meta-data/placement/region",
	"/latest/meta-data/instance-id",
	"/latest/dynamic/instance-identity/document",
	"/latest/user-data",
	"/latest/meta-data/",
	"/latest/meta-data/network/interfaces/macs/0e:49:61:0f:c3:11/local-ipv4s",
	"/latest/meta-data/./instance-id",
	"/latest/meta-data/%2e%2e/user-data",
}

func BenchmarkPathPolicy(b *testing.B) {
	policy, err := proxy.NewPathPolicy(realisticAllow, realisticDeny)
	if err != nil {
		b.Fatal(err)
	}
	clean := make([]string, len(benchPaths))
	for i, p := range benchPaths {
		if clean[i], err = proxy.NormalisePath(p); err != nil {
			b.Fatal(err)
		}
	}
	// Allows alone, on normalised paths; then what the proxy does per
	// request: normalise the raw path and decide.
	b.Run("Allows", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			policy.Allows(clean[i%len(clean)])
			i++
		}
	})
	b.Run("NormaliseAndAllow/serial", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			p, err := proxy.NormalisePath(benchPaths[i%len(benchPaths)])
			if err != nil {
				b.Fatal(err)
			}
			policy.Allows(p)
			i++
		}
	})
	b.Run("NormaliseAndAllow/parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				p, err := proxy.NormalisePath(benchPaths[i%len(benchPaths)])
				if err != nil {
					b.Error(err)
					return
				}
				policy.Allows(p)
				i++
			}
		})
	})
}

// handlerRequest is a request as net/http's server hands it to the proxy,
// from pipeCaller. The proxy rewrites requests, so each exchange needs its
// own (its construction is part of the measured cost: a few allocations).
func handlerRequest(method, path string, header http.Header) *http.Request {
	return &http.Request{
		Method: method, URL: &url.URL{Path: path}, RequestURI: path,
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: header.Clone(), Host: "169.254.169.254", RemoteAddr: pipeCaller.String(), Body: http.NoBody,
	}
}

// serveRecorded runs one request through the proxy's handler in-process.
func serveRecorded(p http.Handler, r *http.Request) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	p.ServeHTTP(w, r)
	return w
}

// benchProxy is a proxy with paths in front of a fake IMDS, served on
// loopback, logging nothing.
func benchProxy(b *testing.B, paths proxy.PathPolicy) *harness {
	return startProxy(b, newFakeIMDS(b).url, unlogged(), withPaths(paths))
}

// BenchmarkTokenPUT: the proxy answering PUT /latest/api/token, through its
// handler in-process (httptest recorder) and through a real server on
// loopback with a keep-alive client.
func BenchmarkTokenPUT(b *testing.B) {
	h := benchProxy(b, proxy.PathPolicy{})
	header := http.Header{imdsapi.TokenTTLHeader: {"21600"}, "User-Agent": {"aws-sdk-go-v2/1.30.0"}}
	check := func(status int) error {
		if status != http.StatusOK {
			return fmt.Errorf("status %d", status)
		}
		return nil
	}
	b.Run("handler/serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := check(serveRecorded(h.p, handlerRequest(http.MethodPut, "/latest/api/token", header)).Code); err != nil {
				b.Fatal(err)
			}
		}
		reportRate(b, "tokens")
	})
	b.Run("handler/parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := check(serveRecorded(h.p, handlerRequest(http.MethodPut, "/latest/api/token", header)).Code); err != nil {
					b.Error(err)
					return
				}
			}
		})
		reportRate(b, "tokens")
	})
	client := keepAliveClient()
	b.Cleanup(client.CloseIdleConnections)
	b.Run("loopback/serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			r, err := send(client, http.MethodPut, h.url+"/latest/api/token", header)
			if err == nil {
				err = check(r.status)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		reportRate(b, "tokens")
	})
	b.Run("loopback/parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				r, err := send(client, http.MethodPut, h.url+"/latest/api/token", header)
				if err == nil {
					err = check(r.status)
				}
				if err != nil {
					b.Error(err)
					return
				}
			}
		})
		reportRate(b, "tokens")
	})
}

// BenchmarkGETPassThrough: an IMDSv2 GET through the whole proxy to a fake
// IMDS on loopback (no cache): token check, path policy, header scrubbing,
// the upstream round trip with the session token, the answer copied back.
// In parallel each goroutine asks for its own path, so that coalescing of
// identical requests does not hide the upstream round trips. v1 is a
// tokenless GET over loopback, whose caller the proxy looks up in /proc.
func BenchmarkGETPassThrough(b *testing.B) {
	policy, err := proxy.NewPathPolicy(nil, realisticDeny)
	if err != nil {
		b.Fatal(err)
	}
	h := benchProxy(b, policy)
	tok, _, err := h.minter.Mint(pipeCaller.Addr(), token.MaxTTL)
	if err != nil {
		b.Fatal(err)
	}
	header := http.Header{imdsapi.TokenHeader: {tok}, "User-Agent": {"aws-sdk-go-v2/1.30.0"}, "Accept": {"*/*"}}
	const path = "/latest/meta-data/placement/region"
	check := func(w *httptest.ResponseRecorder) error {
		if w.Code != http.StatusOK || w.Body.String() != fakeBody {
			return fmt.Errorf("status %d body %q", w.Code, w.Body.String())
		}
		return nil
	}
	b.Run("handler/serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := check(serveRecorded(h.p, handlerRequest(http.MethodGet, path, header))); err != nil {
				b.Fatal(err)
			}
		}
		reportRate(b, "requests")
	})
	var goroutines atomic.Int64
	b.Run("handler/parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			own := fmt.Sprintf("%s/%d", path, goroutines.Add(1))
			for pb.Next() {
				if err := check(serveRecorded(h.p, handlerRequest(http.MethodGet, own, header))); err != nil {
					b.Error(err)
					return
				}
			}
		})
		reportRate(b, "requests")
	})

	client := keepAliveClient()
	b.Cleanup(client.CloseIdleConnections)
	loopTok, _, err := h.minter.Mint(netip.MustParseAddr("127.0.0.1"), token.MaxTTL)
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		header http.Header
	}{
		{"loopback/v2", http.Header{imdsapi.TokenHeader: {loopTok}, "User-Agent": {"aws-sdk-go-v2/1.30.0"}}},
		{"loopback/v1", http.Header{"User-Agent": {"aws-sdk-go-v2/1.30.0"}}},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				r, err := send(client, http.MethodGet, h.url+path, c.header)
				if err == nil && r.status != http.StatusOK {
					err = fmt.Errorf("status %d", r.status)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			reportRate(b, "requests")
		})
	}
}

// reportRate adds what per second, from b.N and the measured time (for
// RunParallel: all goroutines together).
func reportRate(b *testing.B, what string) {
	if s := b.Elapsed().Seconds(); s > 0 {
		b.ReportMetric(float64(b.N)/s, what+"/s")
	}
}
