package proxy_test

import (
	"net/http"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// TestUpstreamFaults: for each way the upstream can fail, the client gets
// the right status within the documented bound (--upstream-response-timeout
// for a hang, at once otherwise), and the proxy serves normally again, on
// its own, soon after the upstream is healthy. Nothing leaks goroutines.
func TestUpstreamFaults(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	up := newFakeIMDS(t, requiringTokens())
	defer up.close()
	s := startProxy(t, up.url, servedAsTheBinary(), configured(func(c *proxy.Config) {
		c.UpstreamResponseTimeout, c.UpstreamDialTimeout = 300*time.Millisecond, 200*time.Millisecond
		c.UpstreamRetryMin, c.UpstreamRetryMax = 50*time.Millisecond, 200*time.Millisecond
		c.Retry = proxy.RetryConfig{Attempts: 3, BaseDelay: 10 * time.Millisecond, MaxDelay: 50 * time.Millisecond}
	}))
	defer s.stop()
	client := keepAliveClient()
	defer client.CloseIdleConnections()
	auth := http.Header{imdsapi.TokenHeader: {s.token()}}
	// The documented worst case: every attempt waits out the dial and the
	// response timeouts, plus the backoff between attempts.
	cfg := s.cfg
	c := &faultClient{h: s, client: client, auth: auth,
		worst: time.Duration(cfg.Retry.Attempts)*(cfg.UpstreamDialTimeout+cfg.UpstreamResponseTimeout) + 2*cfg.Retry.MaxDelay}

	cases := []struct {
		fault  fault
		name   string
		status []int
		within time.Duration
	}{
		{refuse, "refuses", []int{502}, c.worst},
		{hang, "hangs", []int{504}, c.worst},
		{resetBody, "resets mid-body", []int{502}, c.worst},
		{garbage, "answers garbage", []int{502}, c.worst},
		{unauthorize, "401s a valid session token", []int{502}, c.worst},
	}
	for i, tc := range cases {
		up.fail(tc.fault)
		path := "/latest/meta-data/fault-" + string(rune('a'+i)) // a new path each time: nothing cached
		status, took := c.get(t, path)
		if !slices.Contains(tc.status, status) || took > tc.within {
			t.Errorf("upstream %s: client got %d after %s, want %v within %s", tc.name, status, took, tc.status, tc.within)
		}
		up.fail(healthy)
		if recovered := c.recovers(t, path+"-after", 3*time.Second); !recovered {
			t.Errorf("after the upstream %s, the proxy did not serve again within 3s", tc.name)
		}
	}
	c.flap(t, up)
}

// faultClient is a client with its keep-alive connections to a proxy whose
// upstream fails.
type faultClient struct {
	h      *harness
	client *http.Client
	auth   http.Header
	worst  time.Duration // the longest it may wait
}

// get sends one request and returns the status and how long it took.
func (c *faultClient) get(t *testing.T, path string) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	r, err := send(c.client, http.MethodGet, c.h.url+path, c.auth)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return r.status, time.Since(start)
}

// recovers polls until a GET succeeds or the time is up.
func (c *faultClient) recovers(t *testing.T, path string, within time.Duration) bool {
	return eventually(within, 50*time.Millisecond, func() bool {
		status, _ := c.get(t, path)
		return status == 200
	})
}

// flap switches the upstream between refusing and healthy every 30 ms for a
// second while a client keeps asking: every answer is a success or a clean
// gateway error, never a hang, and the proxy serves once it settles.
func (c *faultClient) flap(t *testing.T, up *fakeIMDS) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 33; i++ {
			up.fail([]fault{refuse, healthy}[i%2])
			time.Sleep(30 * time.Millisecond)
		}
		up.fail(healthy)
	}()
	statuses := map[int]int{}
	for i := 0; ; i++ {
		select {
		case <-done:
			t.Logf("while flapping: %v", statuses)
			if !c.recovers(t, "/latest/meta-data/after-flapping", 3*time.Second) {
				t.Error("after flapping the proxy did not serve again within 3s")
			}
			return
		default:
		}
		status, took := c.get(t, "/latest/meta-data/flap-"+string(rune('a'+i%26)))
		statuses[status]++
		if !slices.Contains([]int{200, 502, 503, 504}, status) || took > c.worst {
			t.Errorf("while flapping: %d after %s", status, took)
		}
	}
}
