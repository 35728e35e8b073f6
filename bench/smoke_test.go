package bench

import (
	"net/http"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// TestLoadAgainstStandIn runs the load generator's two loads, GETs with a
// token and token PUTs, against the stand-in: every request it counts as
// answered was, and none failed.
func TestLoadAgainstStandIn(t *testing.T) {
	up := startStandIn(t)
	tok, err := fetchToken(up.Addr)
	if err != nil {
		t.Fatal(err)
	}
	const requests = 200
	for _, l := range []load{
		{addr: up.Addr, method: http.MethodGet, path: metadataGET, header: map[string]string{imdsapi.TokenHeader: tok}},
		{addr: up.Addr, method: http.MethodPut, path: imdsapi.TokenPath, header: map[string]string{imdsapi.TokenTTLHeader: "21600"}},
	} {
		before := up.requests.Load()
		l.conc, l.maxReqs, l.maxTime, l.warmup = 8, requests, loadTimeLimit, true
		res := l.run()
		if res.ok != requests || res.errs != 0 || res.firstErr != "" {
			t.Errorf("%s %s: %d answered, %d errors (%s); want %d answered", l.method, l.path, res.ok, res.errs, res.firstErr, requests)
		}
		if got := up.requests.Load() - before; got != requests+int64(l.conc) { // each client's warm-up request too
			t.Errorf("%s %s: the stand-in received %d requests, want %d", l.method, l.path, got, requests+l.conc)
		}
	}
}
