package proxy_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
)

func (h *harness) v1Callers() []proxy.V1Caller {
	h.t.Helper()
	rec := httptest.NewRecorder()
	h.p.V1Callers().ServeHTTP(rec, httptest.NewRequest("GET", "/v1-callers", nil))
	var out []proxy.V1Caller
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		h.t.Fatalf("/v1-callers: %v: %s", err, rec.Body.String())
	}
	return out
}

func TestV1CallersTable(t *testing.T) {
	h, _ := startBehindAEMM(t, withV1(imdsapi.V1Block))
	cli := http.Header{"User-Agent": {"aws-cli/1.18.69 Python/2.7.18 Linux/5.10 botocore/1.17.44"}}
	for _, path := range []string{"/latest/meta-data/iam/security-credentials/", "/latest/meta-data/instance-id", "/latest/meta-data/instance-id"} {
		h.do("GET", path, cli)
	}
	h.doFrom(loopbackAddr("127.0.0.2"), "GET", "/latest/meta-data/", http.Header{"User-Agent": {"aws-sdk-java/1.11.0"}})
	h.token() // IMDSv2 traffic is not an IMDSv1 caller

	callers := h.v1Callers()
	if len(callers) != 2 {
		t.Fatalf("want 2 callers, got %+v", callers)
	}
	java, cliCaller := callers[0], callers[1] // most recently seen first
	if java.Caller != "127.0.0.2" || java.SDK != "java" || java.Count != 1 {
		t.Errorf("java caller: %+v", java)
	}
	if cliCaller.Caller != "127.0.0.1" || cliCaller.SDK != "aws-cli" || cliCaller.Count != 3 || len(cliCaller.ExamplePaths) != 2 {
		t.Errorf("aws-cli caller: %+v", cliCaller)
	}
	if cliCaller.FirstSeen.After(cliCaller.LastSeen) || cliCaller.FirstSeen.IsZero() {
		t.Errorf("first/last seen: %v / %v", cliCaller.FirstSeen, cliCaller.LastSeen)
	}
	if n := h.metric("imds_proxy_v1_requests_by_sdk_total", map[string]string{"sdk": "aws-cli"}); n != 3 {
		t.Errorf("v1 requests by sdk aws-cli = %v, want 3", n)
	}
}

// TestV1CallersTableIsBounded: distinct hostile User-Agents cannot grow it.
func TestV1CallersTableIsBounded(t *testing.T) {
	h, _ := startBehindAEMM(t, configured(func(c *proxy.Config) { c.V1CallersMax = 3 }))
	for i := 0; i < 5; i++ {
		h.do("GET", "/latest/meta-data/", http.Header{"User-Agent": {fmt.Sprintf("attacker-%d/%0300d", i, 0)}})
	}
	callers := h.v1Callers()
	if len(callers) != 3 {
		t.Fatalf("table holds %d callers, want its bound 3", len(callers))
	}
	for _, c := range callers {
		if len(c.UserAgent) > 256 || c.SDK != "other" {
			t.Errorf("entry not bounded: user agent of %d bytes, sdk %q", len(c.UserAgent), c.SDK)
		}
	}
	if callers[0].UserAgent[:11] != "attacker-4/" {
		t.Errorf("most recent caller first: got %q", callers[0].UserAgent[:11])
	}
	if n := h.metric("imds_proxy_v1_callers_evicted_total", nil); n != 2 {
		t.Errorf("evictions = %v, want 2", n)
	}
}

// TestV1CallerAttribution: the test process itself calls without a token
// over loopback, sharing the proxy's network and PID namespaces as a
// sidecar's neighbours do; the table names its UID, PID and executable.
func TestV1CallerAttribution(t *testing.T) {
	h, _ := startBehindAEMM(t)
	h.do("GET", "/latest/meta-data/", http.Header{"User-Agent": {"legacy-script/1.0"}})
	callers := h.v1Callers()
	if len(callers) != 1 {
		t.Fatalf("want 1 caller, got %+v", callers)
	}
	c := callers[0]
	exe, _ := os.Executable()
	if c.UID == nil || *c.UID != os.Getuid() || c.PID != os.Getpid() || c.Executable != exe || c.Command == "" {
		t.Errorf("caller process %+v (uid %v); want uid %d, pid %d, executable %s", c.Process, c.UID, os.Getuid(), os.Getpid(), exe)
	}
}

// TestV1AttributionIsRateBounded: a flood of tokenless requests is served,
// logged and counted, but only the first few pay for a /proc scan.
func TestV1AttributionIsRateBounded(t *testing.T) {
	h, _ := startBehindAEMM(t, withV1(imdsapi.V1Block), configured(func(c *proxy.Config) { c.V1AttributionsPerSecond = 2 }))
	const flood = 12
	for i := 0; i < flood; i++ {
		h.do("GET", "/latest/meta-data/", http.Header{"User-Agent": {"flood/1.0"}})
	}
	skipped := h.metric("imds_proxy_v1_attributions_skipped_total", nil)
	if skipped < flood-4 || skipped > flood-2 {
		t.Errorf("%v of %d attributions skipped at 2 a second (burst 2); want about %d", skipped, flood, flood-2)
	}
	if c := h.v1Callers(); len(c) != 1 || c[0].Count != flood || c[0].PID != os.Getpid() {
		t.Errorf("callers %+v: want one caller seen %d times, attributed to this process", c, flood)
	}
	if blocked := h.metric("imds_proxy_requests_total", map[string]string{"outcome": "v1_blocked"}); blocked != flood {
		t.Errorf("%v blocked, want all %d", blocked, flood)
	}
}

// TestV1CallersSurviveAFlood: one address sending a thousand distinct
// User-Agents cannot push the callers already in the table out of it.
func TestV1CallersSurviveAFlood(t *testing.T) {
	h, _ := startBehindAEMM(t, withV1(imdsapi.V1Block))
	real := []string{"aws-cli/1.18.69 Python/2.7.18", "aws-sdk-java/1.11.0", "legacy-script/1.0"}
	for _, ua := range real {
		h.do("GET", "/latest/meta-data/instance-id", http.Header{"User-Agent": {ua}})
	}
	const flood = 1100
	for i := 0; i < flood; i++ {
		h.doFrom(loopbackAddr("127.0.0.2"), "GET", "/latest/meta-data/", http.Header{"User-Agent": {fmt.Sprintf("flood-%d/1.0", i)}})
	}
	callers := h.v1Callers()
	flooder := 0
	for _, c := range callers {
		if c.Caller == "127.0.0.2" {
			flooder++
		}
	}
	for _, ua := range real {
		if !slices.ContainsFunc(callers, func(c proxy.V1Caller) bool { return c.Caller == "127.0.0.1" && c.UserAgent == ua && c.Count == 1 }) {
			t.Errorf("caller %q was evicted by one address's flood (the flooder holds %d of %d entries)", ua, flooder, len(callers))
		}
	}
	// The flooder's requests are attributed to its process up to the
	// attribution rate, and counted as unattributed past it: two quotas.
	if flooder > 2*1024/16 {
		t.Errorf("the flooding address holds %d entries, want at most two quotas of %d", flooder, 1024/16)
	}
	if n := h.metric("imds_proxy_v1_callers_evicted_total", map[string]string{"reason": "quota"}); n != float64(flood-flooder) {
		t.Errorf("%v evictions counted as reason=quota, want the %d flood entries no longer held", n, flood-flooder)
	}
	if n := h.metric("imds_proxy_v1_callers_evicted_total", map[string]string{"reason": "full"}); n != 0 {
		t.Errorf("%v evictions counted as reason=full, want 0: the table never filled", n)
	}
}
