package proxy

import (
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/workload"
)

// Workload series stay bounded however many workloads a node runs: past
// maxWorkloadSeries, new ones count as other, and the first ones keep
// their own series.
func TestWorkloadSeriesAreBounded(t *testing.T) {
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	for i := range maxWorkloadSeries + 50 {
		w := workload.Workload{Platform: "kubernetes", Namespace: "team", Name: fmt.Sprintf("Deployment/app-%d", i)}
		m.countWorkload(w, "v1", imdsapi.V1Warn, "botocore")
	}
	m.countWorkload(workload.Workload{Platform: "kubernetes", Namespace: "team", Name: "Deployment/app-0"}, "v2", "", "")
	m.countWorkload(workload.Workload{}, "v2", "", "")
	if got, want := seriesOf(m.workloadRequests), maxWorkloadSeries+3; got != want {
		t.Errorf("%d series, want %d (the first %d workloads, other, app-0's IMDSv2, unknown)", got, want, maxWorkloadSeries)
	}
	if got := valueOf(t, m.workloadRequests.WithLabelValues("other", "other", "v1", "warn", "botocore")); got != 50 {
		t.Errorf("other: %v requests, want 50", got)
	}
	if got := valueOf(t, m.workloadRequests.WithLabelValues("", "unknown", "v2", "", "")); got != 1 {
		t.Errorf("unknown: %v requests, want 1", got)
	}
}

func seriesOf(c prometheus.Collector) int {
	ch := make(chan prometheus.Metric)
	go func() { c.Collect(ch); close(ch) }()
	n := 0
	for range ch {
		n++
	}
	return n
}

func valueOf(t *testing.T, c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
