package proxy_test

import (
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestConcurrentIdenticalGETsShareOneUpstreamRequest: a burst of clients
// asking for the same path while the upstream is slow costs IMDS one request;
// every client still gets the full answer.
func TestConcurrentIdenticalGETsShareOneUpstreamRequest(t *testing.T) {
	aemm := testutil.StartAEMM(t, "-I")
	slow := testutil.NewDelayingTap(t, aemm.Addr, 300*time.Millisecond)
	h := startProxy(t, slow.URL())
	tok := h.token()
	before := len(slow.Requests())
	client := keepAliveClient()
	defer client.CloseIdleConnections()

	const clients = 200
	paths := []string{"/latest/meta-data/instance-id", "/latest/meta-data/placement/region"}
	want := map[string]string{paths[0]: "i-1234567890abcdef0", paths[1]: "us-east-1"}
	var wg sync.WaitGroup
	errs := make(chan string, clients)
	for i := 0; i < clients; i++ {
		path := paths[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := send(client, http.MethodGet, h.url+path, http.Header{imdsapi.TokenHeader: {tok}})
			if err != nil {
				errs <- err.Error()
				return
			}
			if r.status != 200 || r.body != want[path] {
				errs <- fmt.Sprintf("%d %s", r.status, r.body)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatalf("a client got %s", e)
	}
	perPath := map[string]int{}
	for _, r := range slow.Requests()[before:] {
		perPath[r.Path]++
	}
	t.Logf("%d concurrent clients on 2 paths: upstream requests %v", clients, perPath)
	fetches := len(slow.Requests()) - before
	if coalesced := h.metric("imds_proxy_cache_requests_total", map[string]string{"result": "coalesced"}); int(coalesced) != clients-fetches {
		t.Errorf("coalesced requests counted %v, want %d (clients less upstream fetches)", coalesced, clients-fetches)
	}
	for _, p := range paths {
		// One flight per path; a client that arrives just as a flight lands
		// starts a second one.
		if perPath[p] < 1 || perPath[p] > 2 {
			t.Errorf("%s: %d upstream requests for %d concurrent clients, want 1 (at most 2)", p, perPath[p], clients/2)
		}
	}
}

// TestCoalescedCallersShareOnlyWhatBothAskedFor: two callers in flight at
// once, one sending Range, share one upstream request, and the one without
// Range still gets the whole answer, because the proxy sends the upstream
// none of a client's headers (the upstream here honours Range). Both send
// Accept-Encoding: identity, as botocore does, so that net/http's client adds
// nothing that tells them apart.
func TestCoalescedCallersShareOnlyWhatBothAskedFor(t *testing.T) {
	up := newFakeIMDS(t, requiringTokens(), numberedAnswers())
	slow := testutil.NewDelayingTap(t, up.addr, 300*time.Millisecond)
	h := startProxy(t, slow.URL()) // no cache: only coalescing can share
	tok := h.token()
	client := keepAliveClient()
	defer client.CloseIdleConnections()
	const path = "/latest/user-data"
	const whole = "answer /latest/user-data #1"
	before := len(slow.Requests())

	type result struct {
		response
		err error
	}
	ranged := make(chan result, 1)
	go func() {
		r, err := send(client, http.MethodGet, h.url+path, http.Header{imdsapi.TokenHeader: {tok}, "Range": {"bytes=0-5"}, "Accept-Encoding": {"identity"}})
		ranged <- result{r, err}
	}()
	if err := slow.WaitRequests(before+1, 5*time.Second); err != nil { // the ranged request is upstream, held by the tap
		t.Fatal(err)
	}
	plain := h.do("GET", path, http.Header{imdsapi.TokenHeader: {tok}, "Accept-Encoding": {"identity"}})
	r := <-ranged
	if r.err != nil {
		t.Fatalf("the caller sending Range: %v", r.err)
	}
	if plain.status != 200 || plain.body != whole {
		t.Errorf("the caller without Range got %d %q, want 200 %q", plain.status, plain.body, whole)
	}
	if r.status != 200 || r.body != whole {
		t.Errorf("the caller sending Range got %d %q, want 200 %q (the proxy does not pass Range on)", r.status, r.body, whole)
	}
	seen := slow.Requests()[before:]
	for _, s := range seen {
		if v, ok := s.Header["Range"]; ok {
			t.Errorf("the upstream saw Range %q", v)
		}
	}
	if len(seen) != 1 {
		t.Errorf("the upstream saw %d requests for two callers in flight at once, want 1", len(seen))
	}
}
