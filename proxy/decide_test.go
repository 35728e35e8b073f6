package proxy

import (
	"bufio"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/token"
	"github.com/imds-proxy/imds-proxy/workload"
	"github.com/imds-proxy/imds-proxy/workloadrole"
)

// decided is what TestDecide compares: the answer's status, outcome and
// extra headers, or the path forwarded; and whether IMDSv1 bookkeeping
// applies.
type decided struct {
	status  int
	outcome string
	extra   string // "Name: value" of each extra header an answer carries, sorted, joined by "; "
	forward string // the normalised path forwarded, "" for an answer
	v1      bool
}

// TestDecide is the decision table: one request per row, each changing the
// base (a GET with a valid token, IMDSv1 allowed, user-data denied) to
// reach one rule, in the order decide applies them.
func TestDecide(t *testing.T) {
	caller := netip.MustParseAddr("10.0.3.17")
	const ok = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Aws-Ec2-Metadata-Token: {token}\r\n"
	rows := []struct {
		rule, name string
		raw        string // the request head, with {token} for a valid token of caller's
		mutate     func(*Config, *http.Request)
		want       decided
	}{
		{"limits", "a connection past the limits, even for a token", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-Aws-Ec2-Metadata-Token-Ttl-Seconds: 60\r\n",
			func(_ *Config, r *http.Request) {
				*r = *r.WithContext(context.WithValue(r.Context(), connRecordKey{}, &connRecord{overLimit: true}))
			},
			decided{status: 503, outcome: outcomeTooManyConnections, extra: "Connection: close; Retry-After: 1"}},
		{"limits", "headers past MaxHeaderBytes", ok + "X-Padding: " + strings.Repeat("a", 2000) + "\r\n",
			func(c *Config, _ *http.Request) { c.Limits.MaxHeaderBytes = 1024 },
			decided{status: 431, outcome: outcomeHeaderTooLarge}},
		{"limits", "a body past 4 KiB", ok + "Content-Length: 5000\r\n", nil,
			decided{status: 413, outcome: outcomeBodyTooLarge, extra: "Connection: close"}},
		{"not a proxy", "CONNECT", "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n", nil,
			decided{status: 403, outcome: outcomeNotAProxy}},
		{"not a proxy", "an absolute URI with a valid token", strings.Replace(ok, "/latest", "http://example.com/latest", 1), nil,
			decided{status: 403, outcome: outcomeNotAProxy}},
		{"loop", "the proxy's own id", ok + "X-Imds-Proxy-Id: {id}\r\n", nil,
			decided{status: 508, outcome: outcomeLoop}},
		{"loop", "another proxy's id goes on", ok + "X-Imds-Proxy-Id: 0123456789abcdef\r\n", nil,
			decided{forward: "/latest/meta-data/instance-id"}},
		{"token endpoint", "PUT with a TTL", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-Aws-Ec2-Metadata-Token-Ttl-Seconds: 21600\r\n", nil,
			decided{status: 200, outcome: outcomeTokenIssued, extra: "X-Aws-Ec2-Metadata-Token-Ttl-Seconds: 21600"}},
		{"token endpoint", "GET", "GET /latest/api/token HTTP/1.1\r\nHost: x\r\n", nil,
			decided{status: 405, outcome: outcomeTokenRefused, extra: "Allow: PUT"}},
		{"token endpoint", "X-Forwarded-For", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-Aws-Ec2-Metadata-Token-Ttl-Seconds: 60\r\nX-Forwarded-For: 10.0.0.1\r\n", nil,
			decided{status: 403, outcome: outcomeTokenRefused}},
		{"token endpoint", "no TTL", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n", nil,
			decided{status: 400, outcome: outcomeTokenRefused}},
		{"token endpoint", "TTL 21601", "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-Aws-Ec2-Metadata-Token-Ttl-Seconds: 21601\r\n", nil,
			decided{status: 400, outcome: outcomeTokenRefused}},
		{"method", "POST with a valid token", strings.Replace(ok, "GET", "POST", 1), nil,
			decided{status: 405, outcome: outcomeMethodNotAllowed, extra: "Allow: GET, HEAD"}},
		{"method", "HEAD goes on", strings.Replace(ok, "GET", "HEAD", 1), nil,
			decided{forward: "/latest/meta-data/instance-id"}},
		{"token", "a token that does not verify", strings.Replace(ok, "{token}", "AQAEAG-not-a-token", 1), nil,
			decided{status: 401, outcome: outcomeUnauthorized}},
		{"token", "another caller's token", strings.Replace(ok, "{token}", "{other}", 1), nil,
			decided{status: 401, outcome: outcomeUnauthorized}},
		{"token", "two tokens", ok + "X-Aws-Ec2-Metadata-Token: {token}\r\n", nil,
			decided{status: 400, outcome: outcomeBadRequest}},
		{"IMDSv1", "allow", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n", nil,
			decided{forward: "/latest/meta-data/instance-id", v1: true}},
		{"IMDSv1", "warn", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n",
			func(c *Config, _ *http.Request) { c.V1 = imdsapi.V1Warn },
			decided{forward: "/latest/meta-data/instance-id", v1: true}},
		{"IMDSv1", "block", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n",
			func(c *Config, _ *http.Request) { c.V1 = imdsapi.V1Block },
			decided{status: 401, outcome: outcomeV1Blocked, v1: true}},
		{"IMDSv1", "auto, the upstream refuses IMDSv1", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n",
			func(c *Config, _ *http.Request) { c.V1 = imdsapi.V1Auto },
			decided{status: 401, outcome: outcomeV1Blocked, v1: true}},
		{"IMDSv1", "auto, the upstream serves IMDSv1", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nX-Test-Upstream-V1: served\r\n",
			func(c *Config, _ *http.Request) { c.V1 = imdsapi.V1Auto },
			decided{forward: "/latest/meta-data/instance-id", v1: true}},
		{"IMDSv1", "a chained proxy's probe, block", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Imds-Proxy-Probe: v1\r\n",
			func(c *Config, _ *http.Request) { c.V1 = imdsapi.V1Block },
			decided{status: 401, outcome: outcomeV1Probe}},
		{"IMDSv1", "a chained proxy's probe, allow", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Imds-Proxy-Probe: v1\r\n", nil,
			decided{status: 200, outcome: outcomeV1Probe}},
		{"path", "a denied path", strings.Replace(ok, "meta-data/instance-id", "user-data", 1), nil,
			decided{status: 403, outcome: outcomePathDenied}},
		{"path", "a denied path under another version, dot segments and encoding", strings.Replace(ok, "/latest/meta-data/instance-id", "/2009-04-04/meta-data/%2e%2e//user-data", 1), nil,
			decided{status: 403, outcome: outcomePathDenied}},
		{"path", "a tokenless request for a denied path is an IMDSv1 caller's", "GET /latest/user-data HTTP/1.1\r\nHost: x\r\n", nil,
			decided{status: 403, outcome: outcomePathDenied, v1: true}},
		{"path", "an encoded NUL", strings.Replace(ok, "instance-id", "%00", 1), nil,
			decided{status: 400, outcome: outcomeBadRequest}},
		{"path", "a backslash", strings.Replace(ok, "instance-id", `..\user-data`, 1), nil,
			decided{status: 400, outcome: outcomeBadRequest}},
		{"IMDSv1", "the workload's own block over the configured allow", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n",
			from(workloadWith(workload.V1Key, "block"), nil),
			decided{status: 401, outcome: outcomeV1Blocked, v1: true}},
		{"IMDSv1", "the workload's own allow raised to the floor", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n",
			from(workloadWith(workload.V1Key, "allow"), func(c *Config) { c.V1 = imdsapi.V1Block }),
			decided{status: 401, outcome: outcomeV1Blocked, v1: true}},
		{"IMDSv1", "the workload's own warn, at the floor", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n",
			from(workloadWith(workload.V1Key, "warn"), func(c *Config) { c.V1, c.V1Floor = imdsapi.V1Block, imdsapi.V1Warn }),
			decided{forward: "/latest/meta-data/instance-id", v1: true}},
		{"IMDSv1", "a workload setting that is no policy: the configured one", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n",
			from(workloadWith(workload.V1Key, "sometimes"), func(c *Config) { c.V1 = imdsapi.V1Block }),
			decided{status: 401, outcome: outcomeV1Blocked, v1: true}},
		{"IMDSv1", "a chained proxy's probe answers its workload's policy", "GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Imds-Proxy-Probe: v1\r\n",
			from(workloadWith(workload.V1Key, "block"), nil),
			decided{status: 401, outcome: outcomeV1Probe}},
		{"path", "the node role's credentials, to a workload with its own identity", strings.Replace(ok, "instance-id", "iam/security-credentials/", 1),
			from(workloadWith("", ""), func(c *Config) { c.GuardOwnIdentity = true }),
			decided{status: 404, outcome: outcomeIdentityGuarded}},
		{"path", "the node role's credentials under another version, tokenless", "GET /2021-07-15/meta-data/iam/security-credentials/node-role HTTP/1.1\r\nHost: x\r\n",
			from(workloadWith("", ""), func(c *Config) { c.GuardOwnIdentity = true }),
			decided{status: 404, outcome: outcomeIdentityGuarded, v1: true}},
		{"path", "the rest of IMDS, to a workload with its own identity", strings.Replace(ok, "instance-id", "iam/info", 1),
			from(workloadWith("", ""), func(c *Config) { c.GuardOwnIdentity = true }),
			decided{forward: "/latest/meta-data/iam/info"}},
		{"path", "the node role's credentials, without the guard", strings.Replace(ok, "instance-id", "iam/security-credentials/", 1),
			from(workloadWith("", ""), nil),
			decided{forward: "/latest/meta-data/iam/security-credentials/"}},
		{"path", "the role path, from the workload's own role", strings.Replace(ok, "instance-id", "iam/security-credentials/", 1),
			func(c *Config, _ *http.Request) { c.WorkloadRole = testRole(nil) },
			decided{status: 200, outcome: outcomeWorkloadRole, extra: "X-Imds-Proxy-Credentials: workload; source=irsa"}},
		{"path", "the workload's own role under another version, tokenless", "GET /2021-07-15/meta-data/iam/security-credentials/web-role HTTP/1.1\r\nHost: x\r\n",
			func(c *Config, _ *http.Request) { c.WorkloadRole = testRole(nil) },
			decided{status: 200, outcome: outcomeWorkloadRole, extra: "X-Imds-Proxy-Credentials: workload; source=irsa", v1: true}},
		{"path", "the workload role's ARN in iam/info", strings.Replace(ok, "instance-id", "iam/info", 1),
			func(c *Config, _ *http.Request) { c.WorkloadRole = testRole(nil) },
			decided{status: 200, outcome: outcomeWorkloadRole, extra: "X-Imds-Proxy-Credentials: workload; source=irsa"}},
		{"path", "a role that is not the workload's", strings.Replace(ok, "instance-id", "iam/security-credentials/node-role", 1),
			func(c *Config, _ *http.Request) { c.WorkloadRole = testRole(nil) },
			decided{status: 404, outcome: outcomeWorkloadRole, extra: "X-Imds-Proxy-Credentials: workload; source=irsa"}},
		{"path", "the role path while the workload role's source fails", strings.Replace(ok, "instance-id", "iam/security-credentials/web-role", 1),
			func(c *Config, _ *http.Request) { c.WorkloadRole = testRole(errors.New("STS: AccessDenied")) },
			decided{status: 404, outcome: outcomeWorkloadRoleUnavailable, extra: "X-Imds-Proxy-Credentials: workload; source=irsa"}},
		{"path", "the rest of IMDS, beside the workload's own role", strings.Replace(ok, "instance-id", "iam/", 1),
			func(c *Config, _ *http.Request) { c.WorkloadRole = testRole(nil) },
			decided{forward: "/latest/meta-data/iam/"}},
		{"forward", "the normalised path, without the query", strings.Replace(ok, "/latest/meta-data/instance-id", "/latest//meta-data/./iam/../instance-id?x=1", 1), nil,
			decided{forward: "/latest/meta-data/instance-id"}},
		{"forward", "a trailing slash is kept", strings.Replace(ok, "instance-id", "", 1), nil,
			decided{forward: "/latest/meta-data/"}},
	}
	for _, row := range rows {
		t.Run(row.rule+"/"+row.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Upstream = &url.URL{Scheme: "http", Host: "127.0.0.1:9"} // never contacted: nothing runs the session
			cfg.V1, cfg.Mode = imdsapi.V1Allow, imdsapi.ModeSidecar
			cfg.Retry = RetryConfig{}
			var err error
			if cfg.Paths, err = NewPathPolicy(nil, []string{"/latest/user-data"}); err != nil {
				t.Fatal(err)
			}
			minter, err := token.NewRandomMinter()
			if err != nil {
				t.Fatal(err)
			}
			raw := strings.NewReplacer("{token}", mint(t, minter, caller), "{other}", mint(t, minter, netip.MustParseAddr("10.0.3.18"))).Replace(row.raw)
			request := func(cfg *Config) *http.Request {
				r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw + "\r\n" + strings.Repeat("b", 5000))))
				if err != nil {
					t.Fatalf("%q: %v", raw, err)
				}
				r.RemoteAddr = netip.AddrPortFrom(caller, 40000).String()
				if row.mutate != nil {
					row.mutate(cfg, r)
				}
				return r
			}
			r := request(&cfg)
			p, err := New(cfg, zap.NewNop(), prometheus.NewRegistry(), minter)
			if err != nil {
				t.Fatal(err)
			}
			withID := func(r *http.Request) *http.Request {
				if id := r.Header.Get(imdsapi.LoopHeader); id != "" {
					r.Header.Set(imdsapi.LoopHeader, strings.Replace(id, "{id}", p.id, 1))
				}
				return r
			}
			withID(r)
			// As the first probe would find it: the test header says the upstream serves IMDSv1.
			upstream := upstreamV1Refused
			if r.Header.Get("X-Test-Upstream-V1") == "served" {
				upstream = upstreamV1Served
			}
			p.session.v1.Store(int32(upstream))
			p.session.update("session-token", nil)

			origin, _ := r.Context().Value(testWorkloadKey{}).(workload.Workload)
			v := p.decide(r, caller, func() workload.Workload { return origin })
			got := decided{forward: v.path, v1: v.v1}
			if v.answer != nil {
				got = decided{status: v.answer.status, outcome: v.answer.outcome, v1: v.v1}
				var extra []string
				for name, values := range v.answer.extra {
					extra = append(extra, name+": "+strings.Join(values, ", "))
				}
				slices.Sort(extra)
				got.extra = strings.Join(extra, "; ")
			}
			if got != row.want {
				t.Errorf("%q:\n got %+v\nwant %+v", raw, got, row.want)
			}
			if origin.Known() {
				return // served, the request would have no workload
			}

			// Served, an answer of the proxy's own carries the same headers
			// wherever it is made: here the rows forwarded meet an upstream
			// that refuses connections, and get the forwarder's 502.
			w := httptest.NewRecorder()
			p.ServeHTTP(w, withID(request(&Config{})))
			if want := row.want.status; want != 0 && w.Code != want || want == 0 && w.Code != http.StatusBadGateway {
				t.Errorf("served: status %d, want %d (502 for a forwarded row)", w.Code, want)
			}
			h := w.Result().Header
			// (goproxy leaves Content-Length to net/http, which a recorder is not.)
			length := h.Get("Content-Length")
			if h.Get("Server") != imdsapi.ServerName || h.Get(imdsapi.ProxyHeader) != "sidecar" || h.Get("Content-Type") == "" ||
				length != "" && length != strconv.Itoa(w.Body.Len()) && r.Method != http.MethodHead {
				t.Errorf("served: headers %v for a body of %d bytes, want Server, X-Imds-Proxy, Content-Type and a true Content-Length", h, w.Body.Len())
			}
		})
	}
}

// testRole is a workload role named web-role (IRSA) whose source gives
// fresh credentials, or fails with err.
func testRole(err error) *workloadrole.Role {
	return workloadrole.New("arn:aws:iam::111122223333:role/web-role", workload.IdentityIRSA,
		aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			if err != nil {
				return aws.Credentials{}, err
			}
			return aws.Credentials{AccessKeyID: "ASIAWEBROLE", SecretAccessKey: "web-secret", SessionToken: "web-token",
				CanExpire: true, Expires: time.Now().Add(time.Hour)}, nil
		}))
}

// testWorkloadKey carries a TestDecide row's workload to decide.
type testWorkloadKey struct{}

// from has a TestDecide row's request come from workload w, and changes
// the configuration with configure, if not nil.
func from(w workload.Workload, configure func(*Config)) func(*Config, *http.Request) {
	return func(c *Config, r *http.Request) {
		*r = *r.WithContext(context.WithValue(r.Context(), testWorkloadKey{}, w))
		if configure != nil {
			configure(c)
		}
	}
}

// workloadWith is a pod with an IRSA role whose setting key is value.
func workloadWith(key, value string) workload.Workload {
	return workload.Workload{Platform: "kubernetes", Namespace: "team-a", Name: "Deployment/web",
		OwnIdentity: workload.IdentityIRSA, Settings: map[string]string{key: value}}
}

func mint(t *testing.T, m *token.Minter, caller netip.Addr) string {
	t.Helper()
	tok, _, err := m.Mint(caller, token.MaxTTL)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
