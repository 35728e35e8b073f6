package report

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"strconv"
	"text/tabwriter"
	"time"
)

// WriteTable writes the inventory as an aligned table, for people.
func (inv *Inventory) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintf(tw, "IMDSv1 calls from %s to %s\n", inv.From.UTC().Format(time.RFC3339), inv.To.UTC().Format(time.RFC3339))
	fmt.Fprintln(tw, "NAMESPACE\tWORKLOAD\tPOLICY\tIMDSv1 CALLS\tWOULD-BLOCK\tPROXIES\tFIRST SEEN\tLAST SEEN")
	for _, r := range inv.Rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.0f\t%.0f\t%d\t%s\t%s\n", orDash(r.Namespace), r.Workload, r.Policy, r.Calls, r.WouldBlock,
			r.Proxies, r.FirstSeen.Format(time.RFC3339), r.LastSeen.Format(time.RFC3339))
	}
	if len(inv.Rows) == 0 {
		fmt.Fprintln(tw, "(no workload called IMDSv1 in the window)")
	}
	return tw.Flush()
}

// WriteJSON writes the inventory as JSON, for tools.
func (inv *Inventory) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(struct {
		From     time.Time `json:"from"`
		To       time.Time `json:"to"`
		StepSecs int       `json:"step_seconds"`
		Rows     []Row     `json:"workloads"`
		Burndown []Point   `json:"burndown"`
	}{inv.From.UTC(), inv.To.UTC(), int(inv.Step.Seconds()), nonNil(inv.Rows), nonNil(inv.Burndown)})
}

// WriteCSV writes the rows as CSV with a header line, for spreadsheets.
func (inv *Inventory) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	_ = cw.Write([]string{"namespace", "workload", "policy", "imdsv1_calls", "would_block", "proxies", "first_seen", "last_seen"})
	for _, r := range inv.Rows {
		_ = cw.Write([]string{r.Namespace, r.Workload, r.Policy, strconv.FormatFloat(r.Calls, 'f', 0, 64),
			strconv.FormatFloat(r.WouldBlock, 'f', 0, 64), strconv.Itoa(r.Proxies),
			r.FirstSeen.Format(time.RFC3339), r.LastSeen.Format(time.RFC3339)})
	}
	cw.Flush()
	return cw.Error()
}

// WriteHTML writes a page with no outside references: the burn-down as an
// SVG chart and the table, to attach to a change ticket.
func (inv *Inventory) WriteHTML(w io.Writer) error {
	const width, height = 800.0, 240.0
	peak := 1.0
	for _, p := range inv.Burndown {
		peak = max(peak, p.WouldBlock)
	}
	var points string
	for i, p := range inv.Burndown {
		x := width * float64(i) / float64(max(len(inv.Burndown)-1, 1))
		points += fmt.Sprintf("%.1f,%.1f ", x, height-height*p.WouldBlock/peak)
	}
	return page.Execute(w, struct {
		*Inventory
		Points        string
		Peak          float64
		Width, Height float64
	}{inv, points, peak, width, height})
}

var page = template.Must(template.New("report").Funcs(template.FuncMap{
	"time":   func(t time.Time) string { return t.UTC().Format(time.RFC3339) },
	"calls":  func(f float64) string { return strconv.FormatFloat(f, 'f', 0, 64) },
	"orDash": orDash,
}).Parse(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>IMDSv1 inventory</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
svg{border:1px solid #ccc;background:#fafafa}.block{color:#a00}</style></head><body>
<h1>IMDSv1 inventory</h1>
<p>From {{time .From}} to {{time .To}}, in steps of {{.Step}}: the fleet's tokenless IMDS calls, by workload, from the imds-proxy metrics.</p>
<h2>Burn-down</h2>
<p>IMDSv1 calls per step that --v1 block would refuse: tokens can be required once this stays at zero.</p>
<svg width="{{.Width}}" height="{{.Height}}" viewBox="0 0 {{.Width}} {{.Height}}" role="img" aria-label="would-block IMDSv1 calls per step">
<polyline fill="none" stroke="#c33" stroke-width="2" points="{{.Points}}"/></svg>
<p>Peak: {{calls .Peak}} would-block calls in one step.</p>
<h2>Workloads</h2>
<table><tr><th>Namespace</th><th>Workload</th><th>Policy</th><th>IMDSv1 calls</th><th>Would-block</th><th>Proxies</th><th>First seen</th><th>Last seen</th></tr>
{{range .Rows}}<tr><td>{{orDash .Namespace}}</td><td>{{.Workload}}</td><td{{if eq .Policy "block"}} class="block"{{end}}>{{.Policy}}</td><td>{{calls .Calls}}</td><td>{{calls .WouldBlock}}</td><td>{{.Proxies}}</td><td>{{time .FirstSeen}}</td><td>{{time .LastSeen}}</td></tr>
{{else}}<tr><td colspan="8">No workload called IMDSv1 in the window.</td></tr>{{end}}
</table></body></html>
`))

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}
