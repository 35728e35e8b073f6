package bench

import (
	"crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// standIn is a small, fast IMDS on loopback, in the test process: token PUTs
// answered with the TTL header, a handful of metadata GETs that require one of
// its tokens (401 otherwise). Its tokens are a random per-run prefix and a
// counter, so checking one costs a string comparison and it is never the
// bottleneck. It counts every request it receives.
type standIn struct {
	Addr, URL string
	srv       *http.Server
	prefix    string

	requests, puts, gets, unauthorized atomic.Int64
	// conns counts the connections it accepted: a proxy that does not keep
	// its upstream connections alive opens many.
	conns atomic.Int64
}

var standInMetadata = map[string]string{
	"/latest/meta-data/":                 "ami-id\ninstance-id\nlocal-ipv4\nplacement/\n",
	"/latest/meta-data/instance-id":      "i-0b22a22eec53b9321",
	"/latest/meta-data/ami-id":           "ami-0a887e401f7654935",
	"/latest/meta-data/local-ipv4":       "172.31.10.20",
	"/latest/meta-data/placement/region": "us-east-1",
	"/latest/meta-data/placement/":       "availability-zone\nregion\n",
}

// metadataGET is the path BenchmarkMetadataGET asks for.
const metadataGET = "/latest/meta-data/instance-id"

func startStandIn(t testing.TB) *standIn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	secret := make([]byte, 12)
	_, _ = rand.Read(secret)
	s := &standIn{Addr: ln.Addr().String(), URL: "http://" + ln.Addr().String(), prefix: "AQAE" + hex.EncodeToString(secret) + "-"}
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ConnState: func(_ net.Conn, state http.ConnState) {
			if state == http.StateNew {
				s.conns.Add(1)
			}
		}}
	go func() { _ = s.srv.Serve(ln) }()
	t.Cleanup(func() { _ = s.srv.Close() })
	return s
}

func (s *standIn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.requests.Add(1)
	h := w.Header()
	h["Server"] = []string{imdsapi.ServerName}
	h["Content-Type"] = []string{"text/plain"}
	if r.URL.Path == imdsapi.TokenPath {
		n := s.puts.Add(1)
		if r.Method != http.MethodPut {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		if r.Header.Get("X-Forwarded-For") != "" {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		ttl := r.Header.Get(imdsapi.TokenTTLHeader)
		if secs, err := strconv.Atoi(ttl); err != nil || secs < 1 || secs > 21600 {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		h[imdsapi.TokenTTLHeader] = []string{ttl}
		_, _ = io.WriteString(w, s.prefix+strconv.FormatInt(n, 36))
		return
	}
	s.gets.Add(1)
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	if !strings.HasPrefix(r.Header.Get(imdsapi.TokenHeader), s.prefix) {
		s.unauthorized.Add(1)
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	body, ok := standInMetadata[r.URL.Path]
	if !ok {
		w.WriteHeader(http.StatusNotFound)
		return
	}
	_, _ = io.WriteString(w, body)
}
