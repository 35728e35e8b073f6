package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/imds-proxy/imds-proxy/doctor"
	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/iptables"
)

// exitError ends the process with a specific status and no extra message.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func newDoctorCommand(stdout, stderr io.Writer) *ffcli.Command {
	fs := newFlagSet("imds-proxy doctor", stderr)
	endpoint := fs.String("endpoint", imdsapi.Endpoint, "IMDS endpoint to probe (http://host[:port])")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	return &ffcli.Command{
		Name:       "doctor",
		ShortUsage: "imds-proxy doctor [--endpoint URL] [--json]",
		ShortHelp:  "diagnose IMDS from this network namespace: IMDSv2, IMDSv1, the hop-limit symptom, imds-proxy",
		LongHelp: "Probes the endpoint with short timeouts (under 5 seconds in all) and says what a\n" +
			"workload here would experience. Exit status:\n" +
			"  0  healthy: IMDSv2 works (directly or through imds-proxy)\n" +
			"  2  hop-limit symptom: the token request connects but its answer never arrives\n" +
			"  3  IMDS unreachable (no route, firewall, or HttpEndpoint=disabled)\n" +
			"  4  IMDS refuses IMDSv2 token requests\n" +
			"  5  IMDSv2 fails otherwise\n" +
			"  6  run on a node: the node agent's rules would not deliver containers' traffic\n" +
			"  1  bad usage" + envHelp,
		FlagSet: fs,
		Options: parseOptions(),
		Exec: flagsOnly("imds-proxy doctor", func(ctx context.Context) error {
			u, err := url.Parse(*endpoint)
			if err != nil || u.Scheme != "http" || u.Host == "" {
				return fmt.Errorf("--endpoint %q: want http://host[:port]", *endpoint)
			}
			ctx, cancel := context.WithTimeout(ctx, 4500*time.Millisecond)
			defer cancel()
			report := doctor.Run(ctx, doctor.Config{Endpoint: u, ConnectTimeout: time.Second,
				TokenTimeout: 1500 * time.Millisecond, GetTimeout: time.Second, Rules: doctor.RulesHere, Node: iptables.InspectNode})
			if err := printReport(stdout, report, *asJSON); err != nil {
				return err
			}
			if report.ExitCode != 0 {
				return exitError{report.ExitCode}
			}
			return nil
		}),
	}
}

func printReport(w io.Writer, r doctor.Report, asJSON bool) error {
	if asJSON {
		return json.NewEncoder(w).Encode(r)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "endpoint:           %s\n", r.Endpoint)
	fmt.Fprintf(&b, "connects:           %t\n", r.Connects)
	if r.Connects {
		fmt.Fprintf(&b, "IMDSv2 token:       %s\n", describe(r.Token))
		if r.V2Get != nil {
			fmt.Fprintf(&b, "IMDSv2 metadata:    %s\n", describe(*r.V2Get))
		}
		fmt.Fprintf(&b, "IMDSv1 metadata:    %s\n", describe(r.V1Get))
		fmt.Fprintf(&b, "tokens required:    %t\n", r.TokensRequired)
		fmt.Fprintf(&b, "imds-proxy:         %s\n", orNone(r.Proxy))
		if r.Role != nil {
			fmt.Fprintf(&b, "workload role:      %s, %s %s\n", r.Role.Served, describe(r.Role.Probe), r.Role.Name)
		}
	}
	fmt.Fprintf(&b, "redirect rules:     %s\n", r.Rules)
	if r.Node != nil {
		for _, rule := range r.Node.Rules {
			fmt.Fprintf(&b, "  node rule:        -i %s -j %s %s -> matches %s\n", rule.Interface, rule.Target, rule.Destination,
				orNothing(r.Node.Matches[rule.Interface]))
		}
		fmt.Fprintf(&b, "  not matched:      %s\n", orNothing(r.Node.Unmatched))
	}
	fmt.Fprintf(&b, "\n%s\n", r.Diagnosis)
	for _, fix := range r.Fixes {
		fmt.Fprintf(&b, "  fix: %s\n", fix)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func describe(p doctor.Probe) string {
	switch {
	case p.TimedOut:
		return fmt.Sprintf("no answer (timed out after %.1fs)", p.Seconds)
	case p.Error != "":
		return "failed: " + p.Error
	}
	return fmt.Sprintf("HTTP %d in %.1fms", p.Status, p.Seconds*1000)
}

func orNone(s string) string {
	if s == "" {
		return "not detected"
	}
	return s
}

func orNothing(names []string) string {
	if len(names) == 0 {
		return "nothing"
	}
	return strings.Join(names, ",")
}
