// Command imds-proxy is a transparent proxy for the EC2 Instance Metadata
// Service that makes the IMDSv2 hop limit irrelevant for containers and gives
// operators control over IMDSv1. See the README for the deployment shapes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/peterbourgon/ff/v3"
	"github.com/peterbourgon/ff/v3/ffcli"
	"github.com/peterbourgon/ff/v3/ffyaml"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const envPrefix = "IMDS_PROXY"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := newRootCommand(os.Stdin, os.Stdout, os.Stderr).ParseAndRun(ctx, os.Args[1:]); err != nil {
		var exit exitError
		if !errors.Is(err, flag.ErrHelp) && !errors.As(err, &exit) {
			fmt.Fprintln(os.Stderr, "imds-proxy:", err)
		}
		os.Exit(exitCode(err))
	}
}

func exitCode(err error) int {
	var exit exitError
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &exit):
		return exit.code
	}
	return 1
}

func newRootCommand(stdin io.Reader, stdout, stderr io.Writer) *ffcli.Command {
	fs := flag.NewFlagSet("imds-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	return &ffcli.Command{
		Name:       "imds-proxy",
		ShortUsage: "imds-proxy <sidecar|node|rules|doctor|ready|inject|webhook|version> [flags]",
		LongHelp: "A transparent proxy for the EC2 Instance Metadata Service (IMDS).\n\n" +
			"It answers IMDSv2 token requests itself, so token responses reach containers\n" +
			"whatever the instance's hop limit, keeps its own IMDSv2 session with IMDS,\n" +
			"and logs, counts and optionally blocks IMDSv1 (tokenless) requests.\n\n" +
			"Every flag can also be set from the environment as " + envPrefix + "_<FLAG>, upper\n" +
			"case with dashes as underscores (--log-level: " + envPrefix + "_LOG_LEVEL). Flags win.",
		FlagSet: fs,
		Subcommands: []*ffcli.Command{
			newSidecarCommand(stderr),
			newNodeCommand(stderr),
			newRulesCommand(stdout, stderr),
			newDoctorCommand(stdout, stderr),
			newReadyCommand(stderr),
			newInjectCommand(stdin, stdout, stderr),
			newWebhookCommand(stderr),
			newVersionCommand(stdout),
		},
		Exec: func(context.Context, []string) error { return flag.ErrHelp },
	}
}

func newVersionCommand(stdout io.Writer) *ffcli.Command {
	return &ffcli.Command{
		Name:       "version",
		ShortUsage: "imds-proxy version",
		ShortHelp:  "print the version",
		Exec: func(context.Context, []string) error {
			_, err := fmt.Fprintln(stdout, "imds-proxy", version)
			return err
		},
	}
}

// parseOptions makes every flag settable from the environment and, for the
// serving commands, from a YAML --config file.
func parseOptions() []ff.Option {
	return []ff.Option{ff.WithEnvVarPrefix(envPrefix), ff.WithConfigFileFlag("config"), ff.WithConfigFileParser(ffyaml.Parser)}
}
