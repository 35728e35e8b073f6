package report

import (
	"cmp"
	"slices"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// ProxyCallers is one proxy's /v1-callers table.
type ProxyCallers struct {
	// Proxy names the proxy: its pod, as namespace/name.
	Proxy string
	// Namespace and Workload name what a sidecar serves: its own pod's
	// workload, which names its rows. If zero (a node agent), each row
	// names its own workload, or none is known.
	Namespace, Workload string
	Callers             []proxy.V1Caller
}

// Unknown names the calls of callers no source knew, as the node agents'
// imds_proxy_workload_requests_total does.
const Unknown = "unknown"

// FromCallers is the inventory of the proxies' /v1-callers tables, read at
// at. Each table counts since its proxy started, so the window runs from
// the first call any of them saw, and there is no burn-down. unreached are
// the proxies that did not answer, with the reason.
func FromCallers(proxies []ProxyCallers, unreached []string, at time.Time) *Inventory {
	type key struct{ namespace, workload string }
	rows := map[key]*Row{}
	seenBy := map[key]map[string]bool{}
	callers := map[key]map[string]bool{}
	inv := &Inventory{From: at, To: at, Unreached: unreached}
	for _, p := range proxies {
		for _, c := range p.Callers {
			k := key{p.Namespace, p.Workload}
			switch {
			case c.Workload.Known():
				k = key{c.Workload.Namespace, c.Workload.Name}
			case p.Workload == "":
				k = key{"", Unknown}
			}
			r := rows[k]
			if r == nil {
				r = &Row{Namespace: k.namespace, Workload: k.workload, FirstSeen: c.FirstSeen, LastSeen: c.LastSeen, Policy: string(c.Policy)}
				rows[k], seenBy[k], callers[k] = r, map[string]bool{}, map[string]bool{}
			}
			r.Calls += float64(c.Count)
			r.WouldBlock += float64(c.Count - min(c.Blocked, c.Count))
			seenBy[k][p.Proxy] = true
			// A caller is a program at an address: its container and
			// executable, where attribution saw them.
			callers[k][p.Proxy+"|"+c.Caller+"|"+c.Process.ID+"|"+c.Process.Executable] = true
			if c.SDK != "" && !slices.Contains(r.SDKs, c.SDK) {
				r.SDKs = append(r.SDKs, c.SDK)
			}
			if c.FirstSeen.Before(r.FirstSeen) {
				r.FirstSeen = c.FirstSeen
			}
			if !c.LastSeen.Before(r.LastSeen) {
				r.LastSeen, r.Policy = c.LastSeen, string(c.Policy)
			}
			if c.FirstSeen.Before(inv.From) {
				inv.From = c.FirstSeen
			}
		}
	}
	for k, r := range rows {
		r.Proxies, r.Callers = len(seenBy[k]), len(callers[k])
		slices.Sort(r.SDKs)
		inv.Rows = append(inv.Rows, *r)
	}
	sortRows(inv.Rows)
	return inv
}

// sortRows puts the busiest workloads first.
func sortRows(rows []Row) {
	slices.SortFunc(rows, func(a, b Row) int {
		return cmp.Or(cmp.Compare(b.Calls, a.Calls), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Workload, b.Workload))
	})
}

// blocked says whether a row's latest calls were refused.
func (r Row) blocked() bool { return r.Policy == string(imdsapi.V1Block) }
