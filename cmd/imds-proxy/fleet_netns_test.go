package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestFleetViewOnARealPrometheus: a real Prometheus scrapes a node agent
// (the Kubernetes source on) and a sidecar through a small simulated
// IMDSv1 shutdown. Observe: pod A (Deployment/web) and pod B
// (Pod/batch-runner) call IMDSv1 under warn, pod A also IMDSv2, and the
// sidecar serves an IMDSv1 client. Enforce: pod A's workload is blocked by
// annotation, and its IMDSv1 calls are refused. Fixed: pod B stops calling
// IMDSv1. Every dashboard query and alert expression is run there and
// answers what the traffic implies, asking only for exported metrics, and
// `imds-proxy report` shows the inventory and the burn-down reaching zero.
func TestFleetViewOnARealPrometheus(t *testing.T) {
	k := newKubeNode(t)
	e, podA, podB := k.e, k.workloads[0], k.workloads[1]
	testutil.StartProxy(t, e.Node, kubernetesBinary, nodeArgs("--interfaces", "eni+", "--iptables-backend", "nft", "--v1", "warn",
		"--node-name", kubeNodeName, "--kubeconfig", k.kubeconfig), asNodeAgent(nodeAgentCaps...))
	const sidecarAPI, sidecarAdmin = "127.0.0.1:18169", "127.0.0.1:19169"
	testutil.StartProxy(t, e.Node, binary, []string{"sidecar", "--rules=false", "--v1", "allow", "--listen", sidecarAPI,
		"--metrics-listen", sidecarAdmin, "--upstream", "http://169.254.169.254"})
	rulesFile := filepath.Join("..", "..", "deploy", "prometheus", "rules.yaml")
	prom := testutil.StartPrometheus(t, e.Node, []string{"127.0.0.1:9169", sidecarAdmin}, rulesFile)
	start := time.Now()

	cgroups := testutil.NewCgroups(t)
	// phase sends the traffic of one stage for a few seconds: pod A's
	// IMDSv2 and IMDSv1 calls (wantA answers the latter), pod B's IMDSv1
	// calls unless it is fixed, and the sidecar's IMDSv1 client.
	phase := func(wantA string, podBFixed bool) {
		for end := time.Now().Add(6 * time.Second); time.Now().Before(end); {
			if got := imdsv2In(t, cgroups, podA, "/latest/meta-data/instance-id"); got != "200" {
				t.Fatalf("pod A's IMDSv2 GET: %s", got)
			}
			if got := curlIn(t, cgroups, podA, "/latest/meta-data/instance-id"); got != wantA {
				t.Fatalf("pod A's IMDSv1 GET: %s, want %s", got, wantA)
			}
			if !podBFixed {
				if got := curlIn(t, cgroups, podB, "/latest/meta-data/instance-id"); got != "200" {
					t.Fatalf("pod B's IMDSv1 GET: %s, want 200 (--v1 warn)", got)
				}
			}
			if status, _ := e.Node.Get(t, sidecarAPI, "/latest/meta-data/instance-id", nil); status != http.StatusOK {
				t.Fatalf("the sidecar's IMDSv1 GET: %d", status)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	// Observe, until the sources name both pods (the first requests may
	// come before the pods are listed).
	waitFor(t, 30*time.Second, func() bool {
		phase("200", false)
		return len(prom.Query(t, `imds_proxy_workload_requests_total{workload="Pod/batch-runner"}`)) > 0 &&
			len(prom.Query(t, `imds_proxy_workload_requests_total{workload="Deployment/web"}`)) > 0
	}, "Prometheus to see both pods' workloads")
	phase("200", false) // observed, now that both are named
	// Enforce on pod A's workload.
	k.kube.Patch("Pod", "team-a", k.web.Name, map[string]any{"metadata": map[string]any{"annotations": map[string]string{imdsapi.V1Key: "block"}}})
	waitFor(t, 10*time.Second, func() bool { return curlIn(t, cgroups, podA, "/latest/meta-data/instance-id") == "401" },
		"pod A's IMDSv1 calls refused")
	phase("401", false)
	// Pod B fixed.
	phase("401", true)
	time.Sleep(2 * time.Second) // two more scrapes and rule evaluations

	names := prom.MetricNames(t)
	asked := map[string]bool{}
	queries := testutil.DashboardQueries(t, filepath.Join("..", "..", "deploy", "grafana", "imds-proxy.json"))
	results := map[string][]testutil.Sample{}
	for title, exprs := range queries {
		for _, expr := range exprs {
			results[title] = append(results[title], prom.Query(t, expr)...)
			for _, name := range metricNames(expr) {
				asked[name] = true
			}
		}
	}
	for name := range asked {
		if !slices.Contains(names, name) {
			t.Errorf("a dashboard query asks for %s, which the proxies do not export (they do: %v)", name, names)
		}
	}
	expectSeries := func(title string, want ...string) {
		t.Helper()
		var got []string
		for _, s := range results[title] {
			got = append(got, seriesName(s))
		}
		for _, w := range want {
			if !slices.Contains(got, w) {
				t.Errorf("panel %q: no series %s in %v", title, w, got)
			}
		}
	}
	expectSeries("IMDSv1 calls by workload (the shutdown's burn-down)", "team-a/Deployment/web", "team-a/Pod/batch-runner")
	expectSeries("IMDSv1 calls refused by a workload's block", "team-a/Deployment/web")
	if got := results["IMDSv1 calls refused by a workload's block"]; len(got) != 1 {
		t.Errorf("blocked workloads: %v, want Deployment/web alone", got)
	}
	expectSeries("Would-block (what --v1 block would refuse)", "127.0.0.1:9169", sidecarAdmin)
	expectSeries("Workloads by IMDS version, over the range", "team-a/Deployment/web/v2", "team-a/Deployment/web/v1", "team-a/Pod/batch-runner/v1")
	expectSeries("Upstream session state per proxy", "127.0.0.1:9169/v2", sidecarAdmin+"/v2")
	expectSeries("Requests by outcome", "forwarded", "token_issued", "v1_blocked")
	for _, title := range []string{"Cache hit ratio", "Upstream requests saved", "Upstream latency (p50, p99)", "Connections turned away"} {
		if len(results[title]) == 0 {
			t.Errorf("panel %q: no data", title)
		}
	}
	for _, s := range results["Connections turned away"] {
		if s.Value != 0 {
			t.Errorf("connections turned away: %v, want 0 (no client reached a limit)", s)
		}
	}

	// The alert expressions: only the blocked workload and IMDSv1 still
	// in use are true; every health alert is quiet.
	firing := map[string][]string{}
	for _, rule := range testutil.AlertRules(t, rulesFile) {
		for _, s := range prom.Query(t, rule.Expr) {
			firing[rule.Alert] = append(firing[rule.Alert], seriesName(s))
		}
		for _, name := range metricNames(rule.Expr) {
			if !slices.Contains(names, name) && name != "imds_proxy_redirect_repairs_total" {
				t.Errorf("alert %s asks for %s, which the proxies do not export", rule.Alert, name)
			}
		}
	}
	want := map[string][]string{
		"ImdsProxyBlockedWorkloadCallsIMDSv1": {"team-a/Deployment/web"},
		"ImdsProxyIMDSv1StillUsed":            {"127.0.0.1:9169", sidecarAdmin},
	}
	for alert, series := range firing {
		w := want[alert]
		slices.Sort(series)
		slices.Sort(w)
		if !slices.Equal(series, w) {
			t.Errorf("alert %s's expression is true for %v, want %v", alert, series, w)
		}
	}
	for alert := range want {
		if _, ok := firing[alert]; !ok {
			t.Errorf("alert %s's expression is true for nothing", alert)
		}
	}
	waitFor(t, 10*time.Second, func() bool {
		return len(prom.Query(t, `ALERTS{alertname="ImdsProxyBlockedWorkloadCallsIMDSv1", alertstate="firing", workload="Deployment/web"}`)) == 1
	}, "Prometheus to fire ImdsProxyBlockedWorkloadCallsIMDSv1 for Deployment/web")

	checkReport(t, e.Node, "http://"+prom.Addr, time.Since(start))
}

// checkReport runs `imds-proxy report` against the fleet's Prometheus in
// each format, over the shutdown's window in 3 s steps: pod A's workload
// ends blocked, with the calls it made under warn would-block and the
// later ones not; pod B's calls were all warned and would-block; and the
// burn-down rises, then falls to zero once A is blocked and B fixed.
func checkReport(t *testing.T, ns *testutil.Netns, prometheus string, window time.Duration) {
	t.Helper()
	run := func(format ...string) string {
		cmd := ns.Command(append([]string{binary, "report", "--prometheus", prometheus, "--window", window.Round(time.Second).String(), "--step", "3s"}, format...)...)
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("imds-proxy report %v: %v\n%s", format, err, out)
		}
		return string(out)
	}
	var inv struct {
		Workloads []struct {
			Namespace, Workload, Policy string
			Calls                       float64 `json:"imdsv1_calls"`
			WouldBlock                  float64 `json:"would_block"`
			Proxies                     int
			SDKs                        []string
		}
		Burndown []struct {
			Time       time.Time
			WouldBlock float64 `json:"would_block"`
		}
	}
	if err := json.Unmarshal([]byte(run("--json")), &inv); err != nil {
		t.Fatal(err)
	}
	byName := map[string]int{}
	for i, w := range inv.Workloads {
		byName[w.Namespace+"/"+w.Workload] = i
	}
	web, okWeb := byName["team-a/Deployment/web"]
	batch, okBatch := byName["team-a/Pod/batch-runner"]
	if !okWeb || !okBatch {
		t.Fatalf("report --json: %+v, want team-a/Deployment/web and team-a/Pod/batch-runner", inv.Workloads)
	}
	if w := inv.Workloads[web]; w.Policy != "block" || w.WouldBlock <= 0 || w.WouldBlock >= w.Calls || w.Proxies != 1 {
		t.Errorf("Deployment/web: %+v, want policy block, its calls under warn would-block and its blocked ones not, one proxy", w)
	}
	if w := inv.Workloads[batch]; w.Policy != "warn" || w.Calls <= 0 || w.WouldBlock != w.Calls || !slices.Equal(w.SDKs, []string{"curl"}) {
		t.Errorf("Pod/batch-runner: %+v, want policy warn, every call would-block, from curl", w)
	}
	peak, steps := 0.0, []string{}
	for _, p := range inv.Burndown {
		peak = max(peak, p.WouldBlock)
		steps = append(steps, fmt.Sprintf("%s %.0f", p.Time.Format("15:04:05"), p.WouldBlock))
	}
	t.Logf("burn-down (would-block IMDSv1 calls per 3 s step): %s", strings.Join(steps, ", "))
	if n := len(inv.Burndown); n < 4 || peak <= 0 || inv.Burndown[n-1].WouldBlock != 0 {
		t.Errorf("burn-down %v: want it to rise, then end at zero", steps)
	}
	table := run()
	if !strings.Contains(table, "Deployment/web") || !strings.Contains(table, "NAMESPACE") {
		t.Errorf("report (table):\n%s", table)
	}
	t.Logf("imds-proxy report:\n%s", table)
	if csv := run("--csv"); !strings.HasPrefix(csv, "namespace,workload,policy,imdsv1_calls,would_block,sdks,") || strings.Count(csv, "\n") != 1+len(inv.Workloads) {
		t.Errorf("report --csv:\n%s", csv)
	}
	if html := run("--html"); !strings.Contains(html, "<svg") || !strings.Contains(html, "Pod/batch-runner") || strings.Contains(html, "http://") && !strings.Contains(html, "http://www.w3.org") {
		t.Errorf("report --html is not a self-contained page with the burn-down:\n%s", html)
	}
}

// seriesName names a sample by its identifying labels, in a fixed order:
// namespace/workload, then the instance, version, state or outcome.
func seriesName(s testutil.Sample) string {
	var parts []string
	if ns, w := s.Metric["namespace"], s.Metric["workload"]; w != "" {
		parts = append(parts, ns+"/"+w)
	}
	for _, label := range []string{"instance", "imds_version", "state", "outcome"} {
		if v := s.Metric[label]; v != "" {
			parts = append(parts, v)
		}
	}
	if len(parts) == 0 {
		return fmt.Sprint(s.Metric)
	}
	return strings.Join(parts, "/")
}

// metricNames are the metric names a query asks for, as exported
// (histogram series by their family's name plus _bucket, as stored).
func metricNames(expr string) []string {
	var names []string
	for _, field := range strings.FieldsFunc(expr, func(r rune) bool {
		return !(r == '_' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9')
	}) {
		if strings.HasPrefix(field, "imds_proxy_") {
			names = append(names, field)
		}
	}
	return names
}
