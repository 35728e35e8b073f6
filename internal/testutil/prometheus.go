package testutil

import (
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// DashboardQueries are the PromQL queries of a Grafana dashboard's panels,
// by panel title, with Grafana's interval macros replaced by durations
// Prometheus reads ($__rate_interval and $__interval by 1m, $__range by 1h).
func DashboardQueries(t testing.TB, path string) map[string][]string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var dashboard struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(raw, &dashboard); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	macros := strings.NewReplacer("$__rate_interval", "1m", "$__interval", "1m", "$__range", "1h")
	queries := map[string][]string{}
	for _, p := range dashboard.Panels {
		for _, target := range p.Targets {
			queries[p.Title] = append(queries[p.Title], macros.Replace(target.Expr))
		}
	}
	return queries
}

// AlertRule is one alerting rule of a Prometheus rules file.
type AlertRule struct {
	Alert, Expr string
	For         string
}

// AlertRules are the alerting rules of a Prometheus rules file.
func AlertRules(t testing.TB, path string) []AlertRule {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Groups []struct {
			Rules []struct {
				Alert, Expr, For string
			}
		}
	}
	if err := yaml.Unmarshal(raw, &file); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var rules []AlertRule
	for _, g := range file.Groups {
		for _, r := range g.Rules {
			if r.Alert != "" {
				rules = append(rules, AlertRule{Alert: r.Alert, Expr: r.Expr, For: r.For})
			}
		}
	}
	return rules
}

// Prometheus is a real Prometheus (Debian's package) run by a test.
type Prometheus struct {
	// Addr is where it listens (127.0.0.1:PORT, in its namespace).
	Addr string
	ns   *Netns
}

// StartPrometheus runs Prometheus inside ns on loopback, with a data
// directory of the test's own, scraping targets (host:port, in ns) every
// second and evaluating ruleFiles every second, until the test ends.
func StartPrometheus(t testing.TB, ns *Netns, targets []string, ruleFiles ...string) *Prometheus {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		SkipOutsideCI(t, "prometheus is missing (make deps installs Debian's prometheus package)")
	}
	dir := t.TempDir()
	var rules []string
	for _, f := range ruleFiles {
		abs, err := filepath.Abs(f)
		if err != nil {
			t.Fatal(err)
		}
		rules = append(rules, fmt.Sprintf("%q", abs))
	}
	quoted := make([]string, len(targets))
	for i, target := range targets {
		quoted[i] = fmt.Sprintf("%q", target)
	}
	config := fmt.Sprintf(`global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [%s]
scrape_configs:
  - job_name: imds-proxy
    static_configs: [{targets: [%s]}]
`, strings.Join(rules, ", "), strings.Join(quoted, ", "))
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	p := &Prometheus{Addr: "127.0.0.1:9090", ns: ns}
	logFile := filepath.Join(dir, "prometheus.log")
	// ip netns exec executes Prometheus itself: stopping it stops Prometheus.
	startProcess(t, "prometheus", logFile, "ip", "netns", "exec", ns.Name, bin, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+p.Addr, "--log.level=warn")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if ns.TryDial(t, p.Addr) == nil {
			if status, _ := ns.Get(t, p.Addr, "/-/ready", nil); status == 200 {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus did not become ready in 30s\n%s", tail(logFile))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Sample is one series of an instant query's result.
type Sample struct {
	Metric map[string]string
	Value  float64
}

// Query runs an instant PromQL query and returns its samples; a query
// Prometheus refuses fails the test.
func (p *Prometheus) Query(t testing.TB, query string) []Sample {
	t.Helper()
	status, body := p.ns.Get(t, p.Addr, "/api/v1/query?query="+url.QueryEscape(query), nil)
	var answer struct {
		Status string
		Error  string
		Data   struct {
			ResultType string
			Result     []struct {
				Metric map[string]string
				Value  [2]any
			}
		}
	}
	if err := json.Unmarshal([]byte(body), &answer); err != nil || status != 200 || answer.Status != "success" {
		t.Fatalf("query %q: %d %s %v", query, status, body, err)
	}
	var samples []Sample
	for _, r := range answer.Data.Result {
		var v float64
		if s, ok := r.Value[1].(string); ok {
			_, _ = fmt.Sscan(s, &v)
		}
		samples = append(samples, Sample{Metric: r.Metric, Value: v})
	}
	return samples
}

// MetricNames are the metric names Prometheus has stored.
func (p *Prometheus) MetricNames(t testing.TB) []string {
	t.Helper()
	status, body := p.ns.Get(t, p.Addr, "/api/v1/label/__name__/values", nil)
	var answer struct{ Data []string }
	if err := json.Unmarshal([]byte(body), &answer); err != nil || status != 200 {
		t.Fatalf("metric names: %d %s %v", status, body, err)
	}
	return answer.Data
}
