package doctor

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
	"github.com/imds-proxy/imds-proxy/iptables"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// TestDiagnoseEveryVerdict: each verdict diagnose can reach, with its exit
// code, a phrase of its diagnosis and its first fix ("" for none), and the
// precedence between verdicts whose conditions overlap.
func TestDiagnoseEveryVerdict(t *testing.T) {
	ok := Probe{Status: 200}
	unauthorized := Probe{Status: 401}
	timedOut := Probe{Error: "context deadline exceeded", TimedOut: true}
	broken := &iptables.NodeInspection{Problems: []string{"eni+ matches no interface"}}
	healthyNode := &iptables.NodeInspection{Matches: map[string][]string{"eni+": {"eni1"}}}
	for _, c := range []struct {
		name   string
		report Report
		exit   int
		says   string
		fix    string
	}{
		{"connect timed out", Report{ConnectError: "timed out"}, ExitUnreachable,
			"connections to http://imds time out", "run imds-proxy doctor on the node"},
		{"connect refused", Report{ConnectError: "refused"}, ExitUnreachable,
			"are refused", "start the imds-proxy these rules belong to"},
		{"no route", Report{ConnectError: "no route"}, ExitUnreachable,
			"nothing accepts connections at http://imds (no route", "--http-endpoint enabled"},
		{"unreachable beats the node agent's problems", Report{ConnectError: "refused", Node: broken}, ExitUnreachable,
			"are refused", "start the imds-proxy"},
		{"node agent does not deliver", Report{Connects: true, Token: ok, V2Get: &ok, V1Get: ok, Node: broken}, ExitNodeAgent,
			"does not deliver containers' IMDS traffic: eni+ matches no interface", "run the node agent of this version"},
		{"node agent's problems beat the hop limit", Report{Connects: true, Token: timedOut, V1Get: ok, Node: broken}, ExitNodeAgent,
			"does not deliver", "run the node agent"},
		{"hop limit, IMDSv1 allowed", Report{Connects: true, Token: timedOut, V1Get: ok}, ExitHopLimit,
			"fall back to IMDSv1", hopLimitFixes[0]},
		{"hop limit, tokens required", Report{Connects: true, Token: timedOut, V1Get: unauthorized, TokensRequired: true}, ExitHopLimit,
			"tokens are required, so they get no credentials at all", hopLimitFixes[0]},
		{"hop limit: token fails while IMDSv1 answers", Report{Connects: true, Token: Probe{Error: "connection reset"}, V1Get: ok}, ExitHopLimit,
			"hop-limit symptom", hopLimitFixes[0]},
		{"healthy", Report{Connects: true, Token: ok, V2Get: &ok, V1Get: unauthorized}, ExitHealthy,
			"healthy: IMDSv2 works", ""},
		{"healthy through the proxy", Report{Connects: true, Token: ok, V2Get: &ok, V1Get: ok, Proxy: "sidecar"}, ExitHealthy,
			"healthy: IMDSv2 works, answered by imds-proxy (sidecar)", ""},
		{"healthy, the workload's own role", Report{Connects: true, Token: ok, V2Get: &ok, V1Get: unauthorized, Proxy: "sidecar",
			Role: &RoleProbe{Probe: ok, Served: "workload; source=irsa", Name: "web"}}, ExitHealthy,
			"which serves the workload's own role web (workload; source=irsa), never the instance's", ""},
		{"the workload's own role has no credentials", Report{Connects: true, Token: ok, V2Get: &ok, V1Get: unauthorized, Proxy: "sidecar",
			Role: &RoleProbe{Probe: Probe{Status: 404}, Served: "workload; source=task-role"}}, ExitWorkloadRole,
			"has no credentials of it: its source fails, so the role path answers HTTP 404", "read the sidecar's log"},
		{"healthy node", Report{Connects: true, Token: ok, V2Get: &ok, V1Get: ok, Node: healthyNode}, ExitHealthy,
			"healthy", ""},
		{"metadata 401", Report{Connects: true, Token: ok, V2Get: &unauthorized, V1Get: unauthorized}, ExitV2Refused,
			"IMDS issued an IMDSv2 token but refused it", "check for a proxy or NAT"},
		{"metadata 403 from the proxy", Report{Connects: true, Token: ok, V2Get: &Probe{Status: 403}, V1Get: unauthorized, Proxy: "node"}, ExitV2Refused,
			"imds-proxy (node) issues IMDSv2 tokens but forbids the metadata", "check the proxy's --allow-path"},
		{"metadata 500", Report{Connects: true, Token: ok, V2Get: &Probe{Status: 500}, V1Get: unauthorized}, ExitV2Unavailable,
			"HTTP 500 to GET /latest/meta-data/", ""},
		{"metadata timed out", Report{Connects: true, Token: ok, V2Get: &timedOut, V1Get: unauthorized}, ExitV2Unavailable,
			"did not complete (GET /latest/meta-data/ failed: context deadline exceeded)", ""},
		{"token refused", Report{Connects: true, Token: Probe{Status: 403}, V1Get: unauthorized}, ExitV2Refused,
			"refuses IMDSv2 tokens here (HTTP 403 to the token request)", ""},
		{"token fails and so does IMDSv1", Report{Connects: true, Token: Probe{Error: "connection reset"}, V1Get: Probe{Error: "connection reset"}}, ExitV2Unavailable,
			"IMDSv2 is not working here: connection reset", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := c.report
			in.Endpoint = "http://imds"
			r := diagnose(in)
			if r.ExitCode != c.exit || !strings.Contains(r.Diagnosis, c.says) {
				t.Errorf("exit %d, diagnosis %q; want exit %d saying %q", r.ExitCode, r.Diagnosis, c.exit, c.says)
			}
			switch {
			case c.fix == "" && len(r.Fixes) > 0:
				t.Errorf("fixes %q; want none", r.Fixes)
			case c.fix != "" && (len(r.Fixes) == 0 || !strings.Contains(r.Fixes[0], c.fix)):
				t.Errorf("fixes %q; want the first to say %q", r.Fixes, c.fix)
			}
		})
	}
}

// TestDoctorBehindAProxyDenyingMetadata runs the probes against a real
// imds-proxy (in front of amazon-ec2-metadata-mock, tokens required) whose
// path policy denies /latest/meta-data/: its token works, its metadata
// GET is 403.
func TestDoctorBehindAProxyDenyingMetadata(t *testing.T) {
	aemm := testutil.StartAEMM(t, "-I")
	upstream, _ := url.Parse(aemm.URL)
	paths, err := proxy.NewPathPolicy(nil, []string{"/latest/meta-data"})
	if err != nil {
		t.Fatal(err)
	}
	minter, err := token.NewRandomMinter()
	if err != nil {
		t.Fatal(err)
	}
	cfg := proxy.Config{Upstream: upstream, V1: imdsapi.V1Block, Paths: paths, Mode: imdsapi.ModeSidecar, UpstreamV1Fallback: true,
		UpstreamTokenTTL: time.Hour, UpstreamTokenTimeout: 2 * time.Second, UpstreamRetryMin: time.Hour, UpstreamRetryMax: time.Hour,
		UpstreamDialTimeout: time.Second, UpstreamResponseTimeout: 2 * time.Second}
	p, err := proxy.New(cfg, zap.NewNop(), prometheus.NewRegistry(), minter)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go p.Run(ctx)
	srv := httptest.NewServer(p)
	t.Cleanup(func() { srv.Close(); cancel() })
	endpoint, _ := url.Parse(srv.URL)
	r := Run(context.Background(), Config{Endpoint: endpoint, ConnectTimeout: time.Second, TokenTimeout: time.Second, GetTimeout: time.Second})
	if r.Token.Status != http.StatusOK || r.V2Get == nil || r.V2Get.Status != http.StatusForbidden || r.Proxy != "sidecar" {
		t.Fatalf("probes %+v: want the token answered by the sidecar and the GET refused 403", r)
	}
	if strings.Contains(r.Diagnosis, "refuses IMDSv2 tokens") || !strings.Contains(r.Diagnosis, "HTTP 403 to GET /latest/meta-data/") || r.ExitCode != ExitV2Refused {
		t.Errorf("exit %d, diagnosis %q; want the metadata GET's 403 named", r.ExitCode, r.Diagnosis)
	}
}
