package proxy_test

import (
	"fmt"
	"testing"

	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// TestPathPolicyResistsTricks: a workload denied user-data and IAM cannot
// reach them by any spelling, and nothing denied is forwarded.
func TestPathPolicyResistsTricks(t *testing.T) {
	policy, err := proxy.NewPathPolicy(nil, []string{"/latest/user-data", "/latest/meta-data/iam/"})
	if err != nil {
		t.Fatal(err)
	}
	h, tap := startBehindAEMM(t, func(c *proxy.Config) { c.Paths = policy }, nil)
	tok := h.token()
	cases := []struct {
		path     string
		status   int
		upstream string // the path the upstream must see; "" = nothing forwarded
	}{
		{"/latest/user-data", 403, ""},
		{"/latest/user-data/", 403, ""},
		{"//latest/user-data", 403, ""},
		{"/latest//user-data", 403, ""},
		{"/latest/./user-data", 403, ""},
		{"/latest/meta-data/../user-data", 403, ""},
		{"/latest/meta-data/%2e%2e/user-data", 403, ""},
		{"/latest/%75ser-data", 403, ""},
		{"/latest/user%2Ddata", 403, ""},
		{"/latest/meta-data/iam", 403, ""},
		{"/latest/meta-data/iam/security-credentials/", 403, ""},
		{"/latest/meta-data/iam/security-credentials/baskinc-role", 403, ""},
		{"/latest/meta-data/./iam/info", 403, ""},
		{"/latest/meta-data/iam%2finfo", 403, ""},
		{"/latest/%252e%252e/user-data", 400, ""},
		{"/latest/user-data%00", 400, ""},
		{"/latest/meta-data\\..\\user-data", 400, ""},
		{"/latest/meta-data/instance-id", 200, "/latest/meta-data/instance-id"},
		{"/latest/meta-data/./instance-id", 200, "/latest/meta-data/instance-id"},
		{"/latest/meta-data/iamx", 404, "/latest/meta-data/iamx"}, // a prefix matches whole segments only
	}
	for _, c := range cases {
		t.Run(c.path, func(t *testing.T) {
			before := len(tap.Requests())
			r := h.raw(fmt.Sprintf("GET %s HTTP/1.1\r\nHost: x\r\n%s: %s\r\n\r\n", c.path, token.Header, tok))
			if r.status != c.status {
				t.Errorf("status %d, want %d", r.status, c.status)
			}
			seen := tap.Requests()[before:]
			switch {
			case c.upstream == "" && len(seen) != 0:
				t.Errorf("a denied path reached the upstream: %+v", seen)
			case c.upstream != "" && (len(seen) != 1 || seen[0].Path != c.upstream):
				t.Errorf("upstream saw %+v, want one request for %s", seen, c.upstream)
			}
		})
	}
	if n := h.metric("imds_proxy_requests_total", map[string]string{"outcome": "path_denied"}); n != 14 {
		t.Errorf("path_denied counter = %v, want 14", n)
	}
}

func TestPathAllowList(t *testing.T) {
	policy, err := proxy.NewPathPolicy([]string{"/latest/meta-data/placement"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	h, _ := startBehindAEMM(t, func(c *proxy.Config) { c.Paths = policy }, nil)
	tok := h.token() // the token endpoint is never subject to the path policy
	for path, want := range map[string]int{
		"/latest/meta-data/placement/region": 200,
		"/latest/meta-data/instance-id":      403,
		"/latest/user-data":                  403,
	} {
		if r := h.do("GET", path, map[string][]string{token.Header: {tok}}); r.status != want {
			t.Errorf("%s: %d, want %d", path, r.status, want)
		}
	}
}

func TestV1WarnServesAndCountsWhatBlockWouldRefuse(t *testing.T) {
	h, _ := startBehindAEMM(t, func(c *proxy.Config) { c.V1 = proxy.V1Warn }, nil)
	for i := 0; i < 3; i++ {
		if r := h.do("GET", "/latest/meta-data/instance-id", nil); r.status != 200 {
			t.Fatalf("tokenless GET with --v1 warn: %d, want 200", r.status)
		}
	}
	if n := len(h.logsContaining("--v1 block would refuse it")); n != 3 {
		t.Errorf("%d warnings, want 3", n)
	}
	if n := h.metric("imds_proxy_v1_would_block_total", nil); n != 3 {
		t.Errorf("imds_proxy_v1_would_block_total = %v, want 3", n)
	}
}

func TestNewPathPolicyRejectsBadPrefixes(t *testing.T) {
	for _, bad := range []string{"latest/user-data", "/latest/%zz", "/latest/\\user-data"} {
		if _, err := proxy.NewPathPolicy(nil, []string{bad}); err == nil {
			t.Errorf("prefix %q accepted", bad)
		}
	}
}
