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
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// TestTokenWorksMetadataRefused: the token request succeeds but the
// metadata GET with that token does not; the diagnosis must say so, not
// that tokens are refused.
func TestTokenWorksMetadataRefused(t *testing.T) {
	for _, c := range []struct {
		name string
		get  Probe
		exit int
		says string
	}{
		{"403", Probe{Status: 403}, ExitV2Refused, "HTTP 403 to GET /latest/meta-data/"},
		{"401", Probe{Status: 401}, ExitV2Refused, "HTTP 401 to GET /latest/meta-data/"},
		{"500", Probe{Status: 500}, ExitV2Unavailable, "HTTP 500 to GET /latest/meta-data/"},
		{"timed out", Probe{Error: "context deadline exceeded", TimedOut: true}, ExitV2Unavailable, "GET /latest/meta-data/ failed"},
	} {
		t.Run(c.name, func(t *testing.T) {
			get := c.get
			r := diagnose(Report{Connects: true, Token: Probe{Status: 200}, V2Get: &get, V1Get: Probe{Status: 401}})
			if strings.Contains(r.Diagnosis, "refuses IMDSv2 tokens") || !strings.Contains(r.Diagnosis, c.says) || r.ExitCode != c.exit {
				t.Errorf("exit %d, diagnosis %q; want exit %d naming %q, not a refused token", r.ExitCode, r.Diagnosis, c.exit, c.says)
			}
		})
	}
	r := diagnose(Report{Connects: true, Token: Probe{Status: 403}, V1Get: Probe{Status: 401}})
	if r.ExitCode != ExitV2Refused || !strings.Contains(r.Diagnosis, "HTTP 403 to the token request") {
		t.Errorf("a refused token request: exit %d, %q", r.ExitCode, r.Diagnosis)
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
