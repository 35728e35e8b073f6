package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// TestUnknownCommandsAndArgumentsFail: a typo'd subcommand or a stray
// argument exits 1 with one line on stderr naming it, so a container whose
// command has a typo does not look like a clean exit to ECS or Kubernetes.
// Every case fails before anything is served or probed.
func TestUnknownCommandsAndArgumentsFail(t *testing.T) {
	for _, c := range []struct {
		args []string
		line string
	}{
		{[]string{"sidcar"}, `imds-proxy: unknown command "sidcar"; see imds-proxy --help`},
		{[]string{"reprot"}, `imds-proxy: unknown command "reprot"; see imds-proxy --help`},
		{[]string{"report"}, `imds-proxy: give one of --prometheus (the URL of the Prometheus that scrapes the proxies) or --kubeconfig (the cluster to read them in)`},
		{[]string{"report", "--prometheus", "http://127.0.0.1:9", "--kubeconfig", "kubeconfig"}, `imds-proxy: give one of --prometheus (the URL of the Prometheus that scrapes the proxies) or --kubeconfig (the cluster to read them in)`},
		{[]string{"report", "--prometheus", "http://127.0.0.1:9", "--json", "--csv"}, `imds-proxy: --json, --csv and --html: choose one`},
		{[]string{"report", "--prometheus", "127.0.0.1:9090"}, `imds-proxy: --prometheus "127.0.0.1:9090": want http(s)://host:port`},
		{[]string{"sidcar", "--listen", "127.0.0.1:0"}, `imds-proxy: unknown command "sidcar"; see imds-proxy --help`},
		{[]string{"rules", "instal"}, `imds-proxy: unknown command "rules instal"; see imds-proxy rules --help`},
		{[]string{"inject", "k8"}, `imds-proxy: unknown command "inject k8"; see imds-proxy inject --help`},
		{[]string{"sidecar", "extra"}, `imds-proxy: unexpected arguments ["extra"]; see imds-proxy sidecar --help`},
		{[]string{"node", "--rules=false", "extra"}, `imds-proxy: unexpected arguments ["extra"]; see imds-proxy node --help`},
		{[]string{"rules", "install", "extra"}, `imds-proxy: unexpected arguments ["extra"]; see imds-proxy rules install --help`},
		{[]string{"rules", "remove", "a", "b"}, `imds-proxy: unexpected arguments ["a" "b"]; see imds-proxy rules remove --help`},
		{[]string{"rules", "show", "--mode", "node", "extra"}, `imds-proxy: unexpected arguments ["extra"]; see imds-proxy rules show --help`},
		{[]string{"doctor", "extra"}, `imds-proxy: unexpected arguments ["extra"]; see imds-proxy doctor --help`},
		{[]string{"ready", "extra"}, `imds-proxy: unexpected arguments ["extra"]; see imds-proxy ready --help`},
		{[]string{"webhook", "extra"}, `imds-proxy: unexpected arguments ["extra"]; see imds-proxy webhook --help`},
		{[]string{"version", "extra"}, `imds-proxy: unexpected arguments ["extra"]; see imds-proxy version --help`},
		{[]string{"inject", "k8s", "a.yaml", "b.yaml"}, `imds-proxy: one input file at most, got ["a.yaml" "b.yaml"]`},
		{[]string{"inject", "ecs", "a.json", "b.json"}, `imds-proxy: one input file at most, got ["a.json" "b.json"]`},
	} {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := execute(context.Background(), c.args, strings.NewReader(""), &stdout, &stderr)
			if code != 1 || stderr.String() != c.line+"\n" || stdout.Len() != 0 {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit 1 and only the line %q", code, stdout.String(), stderr.String(), c.line)
			}
		})
	}
}

// TestCommandGroupsAloneShowUsage: the root command, rules and inject
// without a subcommand, and --help, print the usage and exit 0, as before.
func TestCommandGroupsAloneShowUsage(t *testing.T) {
	for _, args := range [][]string{nil, {"--help"}, {"rules"}, {"rules", "--help"}, {"inject"}, {"inject", "-h"}, {"sidecar", "--help"}} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := execute(context.Background(), args, strings.NewReader(""), &stdout, &stderr)
			if code != 0 || !strings.Contains(stderr.String(), "USAGE") || stdout.Len() != 0 {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit 0 and the usage on stderr", code, stdout.String(), stderr.String())
			}
		})
	}
}

// TestTypoExitsNonZero: the built binary's exit status is what execute
// returns.
func TestTypoExitsNonZero(t *testing.T) {
	stdout, stderr, code := runCLI(t, nil, "sidcar")
	if want := "imds-proxy: unknown command \"sidcar\"; see imds-proxy --help\n"; code != 1 || stderr != want || stdout != "" {
		t.Errorf("exit %d, stdout %q, stderr %q; want exit 1 and %q", code, stdout, stderr, want)
	}
}
