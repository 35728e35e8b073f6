package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"sigs.k8s.io/yaml"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

const prometheusDir = "prometheus"

// TestPrometheusRules: the alerting rules pass promtool's check and its
// unit tests (prometheus/rules_test.yaml: each alert fires on its trouble
// and not on a healthy neighbour), and the PrometheusRule holds exactly
// the same groups (generated from rules.yaml; -update rewrites it),
// decoding strictly into the prometheus-operator's type.
func TestPrometheusRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		testutil.SkipOutsideCI(t, "promtool is missing (make deps installs Debian's prometheus package for it)")
	}
	for _, args := range [][]string{{"check", "rules", "rules.yaml"}, {"test", "rules", "rules_test.yaml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = prometheusDir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}

	plain, err := os.ReadFile(filepath.Join(prometheusDir, "rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	want := prometheusRule(t, plain)
	out := filepath.Join(prometheusDir, "prometheusrule.yaml")
	if *update {
		if err := os.WriteFile(out, want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s is not rules.yaml's groups; regenerate it with\n  go test ./deploy -run TestPrometheusRules -update", out)
	}
	var rule monitoringv1.PrometheusRule
	if err := yaml.UnmarshalStrict(got, &rule); err != nil {
		t.Fatalf("%s: %v", out, err)
	}
	var rules struct {
		Groups []monitoringv1.RuleGroup `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(plain, &rules); err != nil {
		t.Fatalf("rules.yaml: %v", err)
	}
	if rule.Kind != "PrometheusRule" || rule.Namespace != "imds-proxy" || len(rule.Spec.Groups) != len(rules.Groups) || len(rules.Groups) == 0 {
		t.Errorf("%s: %s %s/%s with %d groups, want a PrometheusRule in imds-proxy with rules.yaml's %d",
			out, rule.Kind, rule.Namespace, rule.Name, len(rule.Spec.Groups), len(rules.Groups))
	}
}

// prometheusRule is the PrometheusRule whose spec holds the groups of the
// plain rules file plain, as they are written there.
func prometheusRule(t *testing.T, plain []byte) []byte {
	_, groups, ok := bytes.Cut(plain, []byte("\ngroups:\n"))
	if !ok {
		t.Fatal("rules.yaml has no groups: line")
	}
	var b bytes.Buffer
	b.WriteString(`# Generated from rules.yaml by go test ./deploy -run TestPrometheusRules -update:
# the same alerting rules for the prometheus-operator. Apply it where the
# operator's Prometheus selects PrometheusRules in the imds-proxy namespace.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: imds-proxy
  namespace: imds-proxy
  labels:
    app.kubernetes.io/name: imds-proxy
    app.kubernetes.io/part-of: imds-proxy
spec:
  groups:
`)
	for _, line := range strings.SplitAfter(string(groups), "\n") {
		if strings.TrimSpace(line) != "" {
			b.WriteString("  ")
		}
		b.WriteString(line)
	}
	return b.Bytes()
}

// TestGrafanaDashboard: every query of the dashboard is PromQL that
// Prometheus's own parser accepts (promtool checks them as recording
// rules), and only the proxies' metrics are asked for. What the queries
// answer is checked against a real Prometheus scraping a node agent, in
// cmd/imds-proxy's TestFleetViewOnARealPrometheus.
func TestGrafanaDashboard(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		testutil.SkipOutsideCI(t, "promtool is missing (make deps installs Debian's prometheus package for it)")
	}
	queries := testutil.DashboardQueries(t, filepath.Join("grafana", "imds-proxy.json"))
	if len(queries) < 8 {
		t.Fatalf("%d panels with queries, want the dashboard's", len(queries))
	}
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	n := 0
	for title, exprs := range queries {
		for _, expr := range exprs {
			n++
			quoted, _ := json.Marshal(expr) // a JSON string is a YAML one
			fmt.Fprintf(&rules, "      - record: dashboard:query%d\n        expr: %s\n", n, quoted)
			for _, match := range metricName.FindAllString(expr, -1) {
				if name := strings.TrimRight(match, "{["); !strings.HasPrefix(name, "imds_proxy_") {
					t.Errorf("panel %q asks for %s, which is no imds-proxy metric", title, name)
				}
			}
		}
	}
	file := filepath.Join(t.TempDir(), "dashboard-rules.yaml")
	if err := os.WriteFile(file, []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", file).CombinedOutput(); err != nil {
		t.Errorf("the dashboard's queries do not parse: %v\n%s\n%s", err, out, rules.String())
	}
}

// metricName finds the metric names in a query: identifiers followed by a
// selector or a range ("name{" or "name[").
var metricName = regexp.MustCompile(`[a-z_:][a-z0-9_:]*(?:\{|\[)`)
