// Package report is the fleet's IMDSv1 inventory: which workloads still
// call IMDS without a token, how often, since when, under which policy,
// from the proxies' metrics in Prometheus. It asks only the Prometheus it
// is given, with one range query.
package report

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// Row is one workload of the inventory.
type Row struct {
	// Namespace is the Kubernetes namespace or the ECS cluster; Workload
	// its top owner, task definition or container name (as the node
	// agents name them in imds_proxy_workload_requests_total).
	Namespace string `json:"namespace"`
	Workload  string `json:"workload"`
	// Proxies is how many proxies (nodes, sidecars) saw its IMDSv1 calls.
	Proxies int `json:"proxies"`
	// Callers is how many programs made them: distinct addresses,
	// containers and executables. Only /v1-callers tells them apart; from
	// Prometheus it is zero, for unknown.
	Callers int `json:"callers,omitempty"`
	// SDKs are the client families its IMDSv1 calls came from, by their
	// User-Agent (go-v1, botocore, aws-cli, curl, other, ...).
	SDKs []string `json:"sdks"`
	// Calls are its IMDSv1 calls in the window; WouldBlock those that
	// --v1 block would have refused (every call not already refused).
	Calls      float64 `json:"imdsv1_calls"`
	WouldBlock float64 `json:"would_block"`
	// FirstSeen and LastSeen bound the steps in which it called.
	FirstSeen time.Time `json:"first_seen"`
	LastSeen  time.Time `json:"last_seen"`
	// Policy is the IMDSv1 policy its latest calls met.
	Policy string `json:"policy"`
}

// Point is the fleet's IMDSv1 calls in one step that --v1 block would
// refuse: the burn-down, which reaches zero when every workload either
// stopped calling IMDSv1 or is blocked, and tokens can be required.
type Point struct {
	Time       time.Time `json:"time"`
	WouldBlock float64   `json:"would_block"`
}

// Inventory is the report: its rows, busiest first, and the burn-down.
type Inventory struct {
	From, To time.Time
	// Step is the burn-down's resolution. If zero, the inventory is a
	// snapshot of the proxies' /v1-callers tables and has no burn-down.
	Step     time.Duration
	Rows     []Row
	Burndown []Point
	// Unreached are the proxies that did not answer, each with why.
	Unreached []string
}

// Query is the one PromQL range query the inventory is made of: the
// IMDSv1 calls of each workload, policy, client family and proxy in each
// step.
func Query(step time.Duration) string {
	return `sum by (namespace, workload, v1_policy, sdk, instance) (increase(imds_proxy_workload_requests_total{imds_version="v1"}[` +
		strconv.FormatInt(int64(step/time.Second), 10) + `s]))`
}

// FromPrometheus asks the Prometheus at base (http://host:port) for the
// window before to, in steps of step (if zero, window/100 and at least a
// minute; at least a second in any case).
func FromPrometheus(ctx context.Context, client *http.Client, base string, window, step time.Duration, to time.Time) (*Inventory, error) {
	if step <= 0 {
		step = max(window/100, time.Minute)
	}
	step = max(step, time.Second).Truncate(time.Second)
	inv := &Inventory{From: to.Add(-window), To: to, Step: step}
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("--prometheus %q: want http(s)://host:port", base)
	}
	q := url.Values{"query": {Query(step)}, "start": {unix(inv.From)}, "end": {unix(to)}, "step": {strconv.Itoa(int(step.Seconds()))}}
	u = u.JoinPath("api/v1/query_range")
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("asking Prometheus: %w", err)
	}
	defer resp.Body.Close()
	var answer struct {
		Status, Error string
		Data          struct {
			Result []struct {
				Metric map[string]string
				Values [][2]any
			}
		}
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&answer); err != nil {
		return nil, fmt.Errorf("Prometheus answered %s, not a query result: %w", resp.Status, err)
	}
	if answer.Status != "success" {
		return nil, fmt.Errorf("Prometheus refused the query: %s %s", resp.Status, answer.Error)
	}
	type key struct{ namespace, workload string }
	rows := map[key]*Row{}
	proxies := map[key]map[string]bool{}
	latest := map[key]time.Time{}
	burndown := map[int64]float64{}
	for _, series := range answer.Data.Result {
		k := key{series.Metric["namespace"], series.Metric["workload"]}
		r := rows[k]
		if r == nil {
			r = &Row{Namespace: k.namespace, Workload: k.workload}
			rows[k], proxies[k] = r, map[string]bool{}
		}
		for _, v := range series.Values {
			at, calls, err := sample(v)
			if err != nil {
				return nil, fmt.Errorf("Prometheus answered a sample that is no number: %w", err)
			}
			if calls <= 0 {
				continue
			}
			r.Calls += calls
			if series.Metric["v1_policy"] != string(imdsapi.V1Block) {
				r.WouldBlock += calls
				burndown[at.Unix()] += calls
			}
			proxies[k][series.Metric["instance"]] = true
			if sdk := series.Metric["sdk"]; sdk != "" && !slices.Contains(r.SDKs, sdk) {
				r.SDKs = append(r.SDKs, sdk)
			}
			if r.FirstSeen.IsZero() || at.Before(r.FirstSeen) {
				r.FirstSeen = at
			}
			if at.After(r.LastSeen) {
				r.LastSeen = at
			}
			if !at.Before(latest[k]) {
				latest[k], r.Policy = at, series.Metric["v1_policy"]
			}
		}
	}
	for k, r := range rows {
		if r.Calls > 0 {
			r.Proxies = len(proxies[k])
			slices.Sort(r.SDKs)
			inv.Rows = append(inv.Rows, *r)
		}
	}
	sortRows(inv.Rows)
	for at := inv.From.Truncate(time.Second); !at.After(to); at = at.Add(step) {
		inv.Burndown = append(inv.Burndown, Point{Time: at.UTC(), WouldBlock: burndown[at.Unix()]})
	}
	return inv, nil
}

func unix(t time.Time) string { return strconv.FormatInt(t.Unix(), 10) }

// sample reads a [time, "value"] pair of a range query's answer.
func sample(v [2]any) (time.Time, float64, error) {
	at, ok := v[0].(float64)
	text, ok2 := v[1].(string)
	if !ok || !ok2 {
		return time.Time{}, 0, errors.New("malformed sample")
	}
	calls, err := strconv.ParseFloat(text, 64)
	return time.Unix(int64(at), 0).UTC(), calls, err
}
