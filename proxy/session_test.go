package proxy

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// TestConcurrentRefreshesCoalesce: many requests that see the same stale
// token cause one upstream token request, and a refresh for a token that has
// already been replaced causes none.
func TestConcurrentRefreshesCoalesce(t *testing.T) {
	var puts atomic.Int32
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut {
			return // the IMDSv1 probe: served
		}
		n := puts.Add(1)
		time.Sleep(50 * time.Millisecond) // long enough for every caller to pile up
		_, _ = w.Write([]byte("token-" + string(rune('0'+n))))
	}))
	defer upstream.Close()
	u, _ := url.Parse(upstream.URL)
	cfg := DefaultConfig()
	cfg.Upstream = u
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	s := newSession(&cfg, "test", newUpstreamTransport(&cfg), zap.NewNop(), m)
	if state, tok := s.refresh(""); state != stateV2 || tok != "token-1" {
		t.Fatalf("first refresh: %v %q", state, tok)
	}

	var wg sync.WaitGroup
	tokens := make([]string, 50)
	for i := range tokens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, tokens[i] = s.refresh("token-1")
		}()
	}
	wg.Wait()
	if n := puts.Load(); n != 2 {
		t.Errorf("50 concurrent refreshes of one stale token made %d upstream requests in all, want 2", n)
	}
	for i, tok := range tokens {
		if tok != "token-2" {
			t.Fatalf("caller %d got %q, want token-2", i, tok)
		}
	}
	if _, tok := s.refresh("token-1"); tok != "token-2" || puts.Load() != 2 {
		t.Errorf("refresh of an already replaced token went upstream")
	}
}
