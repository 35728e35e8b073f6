package report

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteTable writes the inventory as an aligned table, for people.
func (inv *Inventory) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, inv.span())
	fmt.Fprintln(tw, "NAMESPACE\tWORKLOAD\tPOLICY\tIMDSv1 CALLS\tWOULD-BLOCK\tSDKS\tPROXIES\tCALLERS\tFIRST SEEN\tLAST SEEN")
	for _, r := range inv.Rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.0f\t%.0f\t%s\t%d\t%s\t%s\t%s\n", orDash(r.Namespace), r.Workload, r.Policy, r.Calls, r.WouldBlock,
			orDash(strings.Join(r.SDKs, ",")), r.Proxies, r.callers(), r.FirstSeen.Format(time.RFC3339), r.LastSeen.Format(time.RFC3339))
	}
	if len(inv.Rows) == 0 {
		fmt.Fprintln(tw, "(no workload called IMDSv1 in the window)")
	}
	for _, u := range inv.Unreached {
		fmt.Fprintln(tw, "not counted, did not answer: "+u)
	}
	return tw.Flush()
}

// WriteJSON writes the inventory as JSON, for tools.
func (inv *Inventory) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(struct {
		From      time.Time `json:"from"`
		To        time.Time `json:"to"`
		StepSecs  int       `json:"step_seconds"`
		Rows      []Row     `json:"workloads"`
		Burndown  []Point   `json:"burndown"`
		Unreached []string  `json:"unreached"`
	}{inv.From.UTC(), inv.To.UTC(), int(inv.Step.Seconds()), nonNil(inv.Rows), nonNil(inv.Burndown), nonNil(inv.Unreached)})
}

// WriteCSV writes the rows as CSV with a header line, for spreadsheets.
func (inv *Inventory) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	_ = cw.Write([]string{"namespace", "workload", "policy", "imdsv1_calls", "would_block", "sdks", "proxies", "callers", "first_seen", "last_seen"})
	for _, r := range inv.Rows {
		_ = cw.Write([]string{r.Namespace, r.Workload, r.Policy, strconv.FormatFloat(r.Calls, 'f', 0, 64),
			strconv.FormatFloat(r.WouldBlock, 'f', 0, 64), strings.Join(r.SDKs, " "), strconv.Itoa(r.Proxies), strconv.Itoa(r.Callers),
			r.FirstSeen.Format(time.RFC3339), r.LastSeen.Format(time.RFC3339)})
	}
	cw.Flush()
	return cw.Error()
}

// WriteHTML writes a page with no outside references: the burn-down as an
// SVG chart and the table, to attach to a change ticket. It is written with
// fmt and html.EscapeString, not html/template, whose reflection would keep
// every exported method in the binary (about 2 MB more in every sidecar).
func (inv *Inventory) WriteHTML(w io.Writer) error {
	const width, height = 800.0, 240.0
	peak := 1.0
	for _, p := range inv.Burndown {
		peak = max(peak, p.WouldBlock)
	}
	var points strings.Builder
	for i, p := range inv.Burndown {
		x := width * float64(i) / float64(max(len(inv.Burndown)-1, 1))
		fmt.Fprintf(&points, "%.1f,%.1f ", x, height-height*p.WouldBlock/peak)
	}
	var b strings.Builder
	b.WriteString(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>IMDSv1 inventory</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
svg{border:1px solid #ccc;background:#fafafa}.block{color:#a00}</style></head><body>
<h1>IMDSv1 inventory</h1>
`)
	fmt.Fprintf(&b, "<p>%s: the fleet's tokenless IMDS calls, by workload.</p>\n", html.EscapeString(inv.span()))
	if inv.Step > 0 {
		fmt.Fprintf(&b, `<h2>Burn-down</h2>
<p>IMDSv1 calls per step that --v1 block would refuse: tokens can be required once this stays at zero.</p>
<svg width="%[1]g" height="%[2]g" viewBox="0 0 %[1]g %[2]g" role="img" aria-label="would-block IMDSv1 calls per step">
<polyline fill="none" stroke="#c33" stroke-width="2" points="%[3]s"/></svg>
<p>Peak: %[4]s would-block calls in one step.</p>
`, width, height, points.String(), strconv.FormatFloat(peak, 'f', 0, 64))
	} else {
		b.WriteString("<p>No burn-down: each proxy's /v1-callers counts since it started, with no history. Run the report with --prometheus for one.</p>\n")
	}
	b.WriteString(`<h2>Workloads</h2>
<table><tr><th>Namespace</th><th>Workload</th><th>Policy</th><th>IMDSv1 calls</th><th>Would-block</th><th>SDKs</th><th>Proxies</th><th>Callers</th><th>First seen</th><th>Last seen</th></tr>
`)
	for _, r := range inv.Rows {
		class := ""
		if r.blocked() {
			class = ` class="block"`
		}
		fmt.Fprintf(&b, "<tr><td>%s</td><td>%s</td><td%s>%s</td><td>%.0f</td><td>%.0f</td><td>%s</td><td>%d</td><td>%s</td><td>%s</td><td>%s</td></tr>\n",
			html.EscapeString(orDash(r.Namespace)), html.EscapeString(r.Workload), class, html.EscapeString(r.Policy), r.Calls, r.WouldBlock,
			html.EscapeString(strings.Join(r.SDKs, ", ")), r.Proxies, r.callers(), r.FirstSeen.Format(time.RFC3339), r.LastSeen.Format(time.RFC3339))
	}
	if len(inv.Rows) == 0 {
		b.WriteString(`<tr><td colspan="10">No workload called IMDSv1 in the window.</td></tr>` + "\n")
	}
	b.WriteString("</table>\n")
	if len(inv.Unreached) > 0 {
		b.WriteString("<h2>Not counted</h2>\n<p>These proxies did not answer:</p>\n<ul>\n")
		for _, u := range inv.Unreached {
			fmt.Fprintf(&b, "<li>%s</li>\n", html.EscapeString(u))
		}
		b.WriteString("</ul>\n")
	}
	b.WriteString("</body></html>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// span says what the inventory covers.
func (inv *Inventory) span() string {
	if inv.Step > 0 {
		return fmt.Sprintf("IMDSv1 calls from %s to %s, in steps of %s, from the imds-proxy metrics",
			inv.From.UTC().Format(time.RFC3339), inv.To.UTC().Format(time.RFC3339), inv.Step)
	}
	return fmt.Sprintf("IMDSv1 calls each proxy saw since it started (the first at %s), read from their /v1-callers at %s",
		inv.From.UTC().Format(time.RFC3339), inv.To.UTC().Format(time.RFC3339))
}

// callers is how many programs called, or "-" where that is unknown.
func (r Row) callers() string {
	if r.Callers == 0 {
		return "-"
	}
	return strconv.Itoa(r.Callers)
}

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
