package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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
// `imds-proxy report` shows the inventory and the burn-down reaching zero,
// from Prometheus and, through port-forwards, from the proxies themselves.
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
	checkKubernetesReport(t, k, sidecarAdmin)
}

// checkKubernetesReport runs `imds-proxy report --kubeconfig` as a user
// with only the imds-proxy-report ClusterRole. The proxies are pods of the
// API server: the node agent's (host network, admin on the node's
// loopback) and the sidecar's (a native sidecar of team-b's Deployment/api;
// here it runs in the node's namespace too), whose node has a kubelet
// stand-in. The report reads both through port-forwards, counts the node
// agent's workloads exactly as its /v1-callers does, names the sidecar's
// calls after its pod's Deployment, skips a pending proxy pod, and lists
// one that cannot be reached.
func checkKubernetesReport(t *testing.T, k kubeNode, sidecarAdmin string) {
	t.Helper()
	kubelet := k.server.StartKubelet(t, kubeNodeName)
	for _, ns := range []string{"imds-proxy", "team-b"} {
		testutil.KubeCreate(k.kube, &corev1.Namespace{TypeMeta: metav1.TypeMeta{Kind: "Namespace", APIVersion: "v1"}, ObjectMeta: metav1.ObjectMeta{Name: ns}})
		// No controller manager runs to make it.
		testutil.KubeCreate(k.kube, &corev1.ServiceAccount{TypeMeta: metav1.TypeMeta{Kind: "ServiceAccount", APIVersion: "v1"},
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "default"}})
	}
	proxyPod := func(namespace, name string, phase corev1.PodPhase, spec corev1.PodSpec, meta ...func(*metav1.ObjectMeta)) *corev1.Pod {
		m := metav1.ObjectMeta{Namespace: namespace, Name: name}
		for _, f := range meta {
			f(&m)
		}
		spec.NodeName = kubeNodeName
		pod := testutil.KubeCreate(k.kube, &corev1.Pod{TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"}, ObjectMeta: m, Spec: spec})
		k.kube.SetPodIPs(pod, phase, "192.168.1.10")
		return pod
	}
	agent := func(name string, phase corev1.PodPhase) *corev1.Pod {
		return proxyPod("imds-proxy", name, phase, corev1.PodSpec{HostNetwork: true, Containers: []corev1.Container{{
			Name: "imds-proxy", Image: "ghcr.io/imds-proxy/imds-proxy:0.1.0", Command: []string{"/usr/local/bin/imds-proxy-kubernetes"},
			Args: []string{"node", "--listen=:8169", "--metrics-listen=127.0.0.1:9169"}}}})
	}
	kubelet.Runs(agent("imds-proxy-node-7xk2p", corev1.PodRunning), k.e.Node)
	agent("imds-proxy-node-pending", corev1.PodPending)
	agent("imds-proxy-node-elsewhere", corev1.PodRunning) // the kubelet knows no such pod
	always := corev1.ContainerRestartPolicyAlways
	_, adminPort, _ := net.SplitHostPort(sidecarAdmin)
	kubelet.Runs(proxyPod("team-b", "api-7c9d5b8f4-k2x9z", corev1.PodRunning, corev1.PodSpec{
		InitContainers: []corev1.Container{{Name: "imds-proxy", Image: "ghcr.io/imds-proxy/imds-proxy:0.1.0", RestartPolicy: &always,
			Args: []string{"sidecar", "--listen=127.0.0.1:8169", "--metrics-listen=:" + adminPort}}},
		Containers: []corev1.Container{{Name: "app", Image: "public.ecr.aws/docker/library/python:3.13"}},
	}, func(m *metav1.ObjectMeta) {
		m.Labels = map[string]string{"app": "api", "pod-template-hash": "7c9d5b8f4"}
		m.OwnerReferences = ownedBy("ReplicaSet", "apps/v1", "api-7c9d5b8f4", "6d1f3c2e-0000-4000-8000-000000000001")
	}), k.e.Node)

	k.kube.ApplyManifests(filepath.Join("..", "..", "deploy", "kubernetes", "report"))
	testutil.KubeCreate(k.kube, &rbacv1.ClusterRoleBinding{TypeMeta: metav1.TypeMeta{Kind: "ClusterRoleBinding", APIVersion: "rbac.authorization.k8s.io/v1"},
		ObjectMeta: metav1.ObjectMeta{Name: "imds-proxy-report-alice"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "imds-proxy-report"},
		Subjects:   []rbacv1.Subject{{Kind: "User", APIGroup: "rbac.authorization.k8s.io", Name: "alice"}}})
	run := func(user string, format ...string) (string, error) {
		cmd := exec.Command(kubernetesBinary, append([]string{"report", "--kubeconfig", k.server.Kubeconfig(t, k.server.URL, user)}, format...)...)
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			err = fmt.Errorf("%w: %s", err, stderr.String())
		}
		return string(out), err
	}

	if out, err := run("bob"); err == nil || !strings.Contains(err.Error(), "forbidden") {
		t.Errorf("report --kubeconfig as a user without the role: %v\n%s, want it refused, saying so", err, out)
	}

	wantCalls := map[string]int{}
	for _, row := range v1Callers(t, k.e) {
		if row.Workload != "" {
			wantCalls[row.Namespace+"/"+row.Workload] += row.Count
		}
	}
	out, err := run("alice", "--json")
	if err != nil {
		t.Fatalf("report --kubeconfig --json: %v", err)
	}
	var inv struct {
		Workloads []struct {
			Namespace, Workload, Policy string
			Calls                       float64 `json:"imdsv1_calls"`
			WouldBlock                  float64 `json:"would_block"`
			Proxies, Callers            int
		}
		Burndown  []any
		Unreached []string
	}
	if err := json.Unmarshal([]byte(out), &inv); err != nil {
		t.Fatalf("report --kubeconfig --json: %v\n%s", err, out)
	}
	got := map[string]int{}
	for i, w := range inv.Workloads {
		got[w.Namespace+"/"+w.Workload] = i
	}
	for name, calls := range wantCalls {
		if i, ok := got[name]; !ok || inv.Workloads[i].Calls != float64(calls) {
			t.Errorf("report --kubeconfig: %s has %+v, want the node agent's %d IMDSv1 calls", name, inv.Workloads, calls)
		}
	}
	if w := inv.Workloads[got["team-a/Deployment/web"]]; w.Policy != "block" || w.WouldBlock <= 0 || w.WouldBlock >= w.Calls || w.Callers != 1 {
		t.Errorf("Deployment/web: %+v, want block, its warned calls would-block and its refused ones not, one caller", w)
	}
	if w := inv.Workloads[got["team-a/Pod/batch-runner"]]; w.Policy != "warn" || w.WouldBlock != w.Calls || w.Callers != 1 {
		t.Errorf("Pod/batch-runner: %+v, want warn, every call would-block, one caller", w)
	}
	if i, ok := got["team-b/Deployment/api"]; !ok || inv.Workloads[i].Policy != "allow" || inv.Workloads[i].Calls <= 0 ||
		inv.Workloads[i].WouldBlock != inv.Workloads[i].Calls || inv.Workloads[i].Proxies != 1 {
		t.Errorf("report --kubeconfig: %+v, want team-b/Deployment/api, the sidecar's pod's workload, under allow", inv.Workloads)
	}
	if len(inv.Burndown) != 0 || len(inv.Unreached) != 1 || !strings.Contains(inv.Unreached[0], "imds-proxy/imds-proxy-node-elsewhere") || !strings.Contains(inv.Unreached[0], "does not run on node") {
		t.Errorf("burn-down %v, unreached %v: want none, and the pod the kubelet does not run", inv.Burndown, inv.Unreached)
	}
	table, err := run("alice")
	if err != nil || !strings.Contains(table, "Deployment/api") || !strings.Contains(table, "CALLERS") {
		t.Errorf("report --kubeconfig (table): %v\n%s", err, table)
	}
	t.Logf("imds-proxy report --kubeconfig:\n%s", table)
	if html, err := run("alice", "--html"); err != nil || strings.Contains(html, "<svg") || !strings.Contains(html, "No burn-down") {
		t.Errorf("report --kubeconfig --html: %v, want a page that says it has no burn-down:\n%s", err, html)
	}
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
	html := run("--html")
	if !strings.Contains(html, "<svg") || !strings.Contains(html, "Pod/batch-runner") || strings.Contains(html, "http://") && !strings.Contains(html, "http://www.w3.org") {
		t.Errorf("report --html is not a self-contained page with the burn-down:\n%s", html)
	}
	if start, end := strings.Index(html, "<svg"), strings.Index(html, "</svg>"); start >= 0 && end > start {
		t.Logf("report --html's burn-down chart:\n%s", html[start:end+len("</svg>")])
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
