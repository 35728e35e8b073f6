package main

import (
	"context"
	"errors"
	"io"
	"net/http"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/imds-proxy/imds-proxy/report"
)

func newReportCommand(stdout, stderr io.Writer) *ffcli.Command {
	fs := newFlagSet("imds-proxy report", stderr)
	prometheus := fs.String("prometheus", "", "the Prometheus that scrapes the proxies (http://host:port)")
	kubeconfig := fs.String("kubeconfig", "", "instead of --prometheus: the cluster whose proxies to read /v1-callers from, through port-forwards "+
		"(the imds-proxy-kubernetes build)")
	window := fs.Duration("window", 7*24*time.Hour, "how far back the inventory looks")
	step := fs.Duration("step", 0, "the burn-down's resolution (default: a hundredth of --window, at least 1m)")
	timeout := fs.Duration("timeout", 2*time.Minute, "bound on the Prometheus query, or on reading every proxy of the cluster (8 at a time)")
	asJSON := fs.Bool("json", false, "print the inventory and the burn-down as JSON")
	asCSV := fs.Bool("csv", false, "print the inventory as CSV")
	asHTML := fs.Bool("html", false, "print a self-contained HTML page with the burn-down chart, for a change ticket")
	return &ffcli.Command{
		Name:       "report",
		ShortUsage: "imds-proxy report (--prometheus URL [--window 168h] [--step 1h] | --kubeconfig FILE) [--json|--csv|--html]",
		ShortHelp:  "the fleet's IMDSv1 inventory: which workloads still call without a token, from Prometheus or the cluster",
		LongHelp: "Asks Prometheus for the node agents' imds_proxy_workload_requests_total over --window\n" +
			"(one range query) and prints, busiest first, each workload that made IMDSv1 calls: its\n" +
			"namespace, the policy its latest calls met, its calls, those --v1 block would have\n" +
			"refused, how many proxies saw them, and when it was first and last seen; and the\n" +
			"burn-down: the fleet's would-block calls per --step, which must reach zero before the\n" +
			"instances can require tokens.\n\n" +
			"With --kubeconfig instead, for a cluster without Prometheus, it finds the pods running\n" +
			"imds-proxy (node agents and injected sidecars) and reads each one's /v1-callers through\n" +
			"a port-forward, as kubectl port-forward does: the same table, with the distinct callers\n" +
			"and counts since each proxy started, but no burn-down; a proxy that does not answer is\n" +
			"listed with the reason. It needs to list pods, and get and create pods/portforward (the\n" +
			"imds-proxy-report ClusterRole in deploy/kubernetes/report), and the imds-proxy-kubernetes\n" +
			"build." + envHelp,
		FlagSet: fs,
		Options: parseOptions(),
		Exec: flagsOnly("imds-proxy report", func(ctx context.Context) error {
			if (*prometheus == "") == (*kubeconfig == "") {
				return errors.New("give one of --prometheus (the URL of the Prometheus that scrapes the proxies) or --kubeconfig (the cluster to read them in)")
			}
			formats := 0
			for _, set := range []bool{*asJSON, *asCSV, *asHTML} {
				if set {
					formats++
				}
			}
			if formats > 1 {
				return errors.New("--json, --csv and --html: choose one")
			}
			ctx, cancel := context.WithTimeout(ctx, *timeout)
			defer cancel()
			var inv *report.Inventory
			var err error
			if *kubeconfig != "" {
				inv, err = kubernetesReport(ctx, *kubeconfig, time.Now())
			} else {
				inv, err = report.FromPrometheus(ctx, &http.Client{Transport: &http.Transport{Proxy: http.ProxyFromEnvironment}},
					*prometheus, *window, *step, time.Now())
			}
			if err != nil {
				return err
			}
			switch {
			case *asJSON:
				return inv.WriteJSON(stdout)
			case *asCSV:
				return inv.WriteCSV(stdout)
			case *asHTML:
				return inv.WriteHTML(stdout)
			}
			return inv.WriteTable(stdout)
		}),
	}
}
