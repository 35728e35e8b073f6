package main

import (
	"bytes"
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"
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

// TestCredentialsWorkloadSaysWhatIsMissing: --credentials=workload exits 1
// naming what it lacks: the build with the AWS SDK's providers, a source in
// the environment, or both keys and a source (the SDK would pick the keys).
// --workload-role-arn alone is refused too.
func TestCredentialsWorkloadSaysWhatIsMissing(t *testing.T) {
	for _, c := range []struct {
		name, binary string
		env          []string
		args         []string
		want         string
	}{
		{"the lean build", binary, nil, []string{"--credentials=workload"}, "run /usr/local/bin/imds-proxy-workload-role"},
		{"no source", workloadRoleBinary, nil, []string{"--credentials=workload"}, "the environment names no workload role"},
		{"IRSA without its role", workloadRoleBinary, []string{"AWS_WEB_IDENTITY_TOKEN_FILE=/token"}, []string{"--credentials=workload"},
			"without AWS_ROLE_ARN"},
		{"static keys first", workloadRoleBinary, []string{"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/x",
			"AWS_ACCESS_KEY_ID=AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY=x"}, []string{"--credentials=workload"}, "remove them from the sidecar"},
		{"IRSA without a region", workloadRoleBinary, []string{"AWS_WEB_IDENTITY_TOKEN_FILE=/token", "AWS_ROLE_ARN=arn:aws:iam::111122223333:role/r"},
			[]string{"--credentials=workload"}, "IRSA needs AWS_REGION"},
		{"a role ARN alone", workloadRoleBinary, nil, []string{"--workload-role-arn=arn:aws:iam::111122223333:role/r"}, "--credentials=workload, which is not set"},
		{"no such credentials", binary, nil, []string{"--credentials=node"}, `unknown credentials "node"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, c.binary, append([]string{"sidecar", "--rules=false", "--listen", "127.0.0.1:0",
				"--metrics-listen", "", "--upstream", "http://127.0.0.1:9"}, c.args...)...)
			cmd.Env = append([]string{"PATH=/usr/bin:/bin", "HOME=/nonexistent", "AWS_CONFIG_FILE=/dev/null", "AWS_SHARED_CREDENTIALS_FILE=/dev/null"}, c.env...)
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(string(out), c.want) {
				t.Errorf("%v: %v\n%s\nwant exit 1 saying %q", cmd.Args, err, out, c.want)
			}
		})
	}
}
