package proxy_test

import (
	"fmt"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// TestPathPolicyResistsTricks: a workload denied user-data and IAM cannot
// reach them by any spelling or under any API version, and nothing denied is
// forwarded. AEMM serves only /latest/, so an allowed dated path gets its 404:
// what matters there is that the path checked is the path forwarded.
func TestPathPolicyResistsTricks(t *testing.T) {
	policy, err := proxy.NewPathPolicy(nil, []string{"/latest/user-data", "/latest/meta-data/iam/"})
	if err != nil {
		t.Fatal(err)
	}
	h, tap := startBehindAEMM(t, withPaths(policy))
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
		// IMDS serves the same tree under /1.0/ and every dated version.
		{"/2021-07-15/meta-data/iam/security-credentials/baskinc-role", 403, ""},
		{"/2009-04-04/user-data", 403, ""},
		{"/1.0/user-data", 403, ""},
		{"/1.0/meta-data/iam/info", 403, ""},
		{"/2021-07-15/meta-data/iam", 403, ""},
		{"/%32%30%32%31-07-15/user-data", 403, ""},
		{"/2021-07-15//user-data/", 403, ""},
		{"/2021-07-15/meta-data/../user-data", 403, ""},
		{"/latest/../2009-04-04/user-data", 403, ""},
		{"/2009-04-04/../latest/meta-data/iam/info", 403, ""},
		{"/2021-07-15/meta-data/instance-id", 404, "/2021-07-15/meta-data/instance-id"},
		{"/1.0/meta-data/iamx", 404, "/1.0/meta-data/iamx"},
		{"/latest/../2021-07-15/meta-data/instance-id", 404, "/2021-07-15/meta-data/instance-id"},
		// The root lists the versions; a version's root lists its trees.
		{"/", 200, "/"},
		{"//", 200, "/"},
		{"/latest/", 200, "/latest/"},
	}
	for _, c := range cases {
		t.Run(c.path, func(t *testing.T) {
			before := len(tap.Requests())
			r := h.raw(fmt.Sprintf("GET %s HTTP/1.1\r\nHost: x\r\n%s: %s\r\n\r\n", c.path, imdsapi.TokenHeader, tok))
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
	if n := h.metric("imds_proxy_requests_total", map[string]string{"outcome": "path_denied"}); n != 24 {
		t.Errorf("path_denied counter = %v, want 24", n)
	}
}

// TestPathAllowList: an allow list covers its paths under every API version
// and refuses the rest, the root listing included. A 404 is AEMM's answer to
// a dated version it does not serve: the request was forwarded.
func TestPathAllowList(t *testing.T) {
	policy, err := proxy.NewPathPolicy([]string{"/latest/meta-data/placement"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	h, _ := startBehindAEMM(t, withPaths(policy))
	tok := h.token() // the token endpoint is never subject to the path policy
	for path, want := range map[string]int{
		"/latest/meta-data/placement/region":     200,
		"/2021-07-15/meta-data/placement/region": 404,
		"/latest/meta-data/instance-id":          403,
		"/2021-07-15/meta-data/instance-id":      403,
		"/latest/user-data":                      403,
		"/1.0/user-data":                         403,
		"/":                                      403,
		"/latest/":                               403,
	} {
		if r := h.do("GET", path, map[string][]string{imdsapi.TokenHeader: {tok}}); r.status != want {
			t.Errorf("%s: %d, want %d", path, r.status, want)
		}
	}
}

// TestPathPolicyCoversEveryVersion: a prefix is compared below its version
// segment, so one written for any version covers that path in all of them;
// "/" and a bare version cover the whole tree, the root listing included.
func TestPathPolicyCoversEveryVersion(t *testing.T) {
	cases := []struct {
		deny    string
		path    string
		allowed bool
	}{
		{"/latest/user-data", "/2009-04-04/user-data", false},
		{"/2009-04-04/user-data", "/latest/user-data", false},
		{"/1.0/meta-data/iam/", "/2021-07-15/meta-data/iam/security-credentials/r", false},
		{"/latest/meta-data/iam/", "/meta-data/iam/info", false}, // no version: IMDS answers 404, and it is refused before that
		{"/latest/meta-data/iam/", "/latest/meta-data/iamx", true},
		{"/latest/meta-data/iam/", "/2021-07-15/meta-data/", true},
		{"/latest/meta-data/iam/", "/latest/latest/meta-data/iam/info", true}, // only the first segment is a version
		{"/latest/user-data", "/", true},
		{"/latest", "/", false},
		{"/latest", "/2021-07-15/dynamic/instance-identity/document", false},
		{"/", "/1.0/", false},
	}
	for _, c := range cases {
		policy, err := proxy.NewPathPolicy(nil, []string{c.deny})
		if err != nil {
			t.Fatalf("deny %q: %v", c.deny, err)
		}
		if got := policy.Allows(c.path); got != c.allowed {
			t.Errorf("deny %q: Allows(%q) = %v, want %v", c.deny, c.path, got, c.allowed)
		}
	}
}

func TestV1WarnServesAndCountsWhatBlockWouldRefuse(t *testing.T) {
	h, _ := startBehindAEMM(t, withV1(imdsapi.V1Warn))
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

// TestNewPathPolicyRejectsBadPrefixes: a prefix is an IMDS path, which starts
// with a version; one without it ("/meta-data/iam/", a misspelt "/lastest/")
// is refused rather than read as a rule that matches nothing.
func TestNewPathPolicyRejectsBadPrefixes(t *testing.T) {
	for _, bad := range []string{"latest/user-data", "/latest/%zz", "/latest/\\user-data",
		"/meta-data/iam/", "/user-data", "/lastest/user-data", "/2021-7-15/user-data", "/LATEST/user-data"} {
		if _, err := proxy.NewPathPolicy(nil, []string{bad}); err == nil {
			t.Errorf("prefix %q accepted", bad)
		}
		if _, err := proxy.NewPathPolicy([]string{bad}, nil); err == nil {
			t.Errorf("allowed prefix %q accepted", bad)
		}
	}
	for _, good := range []string{"/", "/latest", "/1.0/", "/2009-04-04/user-data", "/latest/meta-data/iam/", " /latest/dynamic "} {
		if _, err := proxy.NewPathPolicy([]string{good}, []string{good}); err != nil {
			t.Errorf("prefix %q refused: %v", good, err)
		}
	}
}
