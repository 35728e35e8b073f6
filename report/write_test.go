package report

import (
	"bytes"
	"encoding/csv"
	"strings"
	"testing"
	"time"
)

// The writers keep a workload's name, which its owner chose, from making
// markup or extra CSV fields.
func TestWritersQuoteWorkloadNames(t *testing.T) {
	at := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	inv := &Inventory{From: at.Add(-time.Hour), To: at, Step: time.Minute,
		Rows: []Row{{Namespace: "team-a", Workload: `Pod/<script>alert(1)</script>,"x"`, Calls: 3, WouldBlock: 3, Proxies: 1,
			FirstSeen: at.Add(-time.Minute), LastSeen: at, Policy: "warn"}},
		Burndown: []Point{{Time: at.Add(-time.Minute), WouldBlock: 1}, {Time: at, WouldBlock: 2}}}
	var html bytes.Buffer
	if err := inv.WriteHTML(&html); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(html.String(), "<script>") || !strings.Contains(html.String(), "&lt;script&gt;") || !strings.Contains(html.String(), "<polyline") {
		t.Errorf("HTML:\n%s", html.String())
	}
	var out bytes.Buffer
	if err := inv.WriteCSV(&out); err != nil {
		t.Fatal(err)
	}
	records, err := csv.NewReader(&out).ReadAll()
	if err != nil || len(records) != 2 || records[1][1] != inv.Rows[0].Workload || len(records[1]) != len(records[0]) {
		t.Errorf("CSV: %q, %v", records, err)
	}
}
