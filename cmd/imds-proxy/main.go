// Command imds-proxy is a transparent proxy for the EC2 Instance Metadata
// Service that makes the IMDSv2 hop limit irrelevant for containers and gives
// operators control over IMDSv1. See the README for the deployments.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
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
	code := execute(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// execute runs the command line args and returns the exit status; an
// error is one line on stderr.
func execute(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	err := newRootCommand(stdin, stdout, stderr).ParseAndRun(ctx, args)
	var exit exitError
	if err != nil && !errors.Is(err, flag.ErrHelp) && !errors.As(err, &exit) {
		fmt.Fprintln(stderr, "imds-proxy:", err)
	}
	return exitCode(err)
}

// exitCode is 1 for every error without a status of its own, bad usage
// included: doctor gives 2 and up their own meanings.
func exitCode(err error) int {
	var exit exitError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &exit):
		return exit.code
	}
	return 1
}

func newRootCommand(stdin io.Reader, stdout, stderr io.Writer) *ffcli.Command {
	return &ffcli.Command{
		Name:       "imds-proxy",
		ShortUsage: "imds-proxy <sidecar|node|rules|doctor|ready|inject|webhook|report|version> [flags]",
		LongHelp: "A transparent proxy for the EC2 Instance Metadata Service (IMDS).\n\n" +
			"It answers IMDSv2 token requests itself, so token responses reach containers\n" +
			"whatever the instance's hop limit, keeps its own IMDSv2 session with IMDS,\n" +
			"and logs, counts and optionally blocks IMDSv1 (tokenless) requests.\n\n" +
			"Every flag can also be set from the environment as " + envPrefix + "_<FLAG>, upper\n" +
			"case with dashes as underscores (--log-level: " + envPrefix + "_LOG_LEVEL). Flags win.",
		FlagSet: newFlagSet("imds-proxy", stderr),
		Subcommands: []*ffcli.Command{
			newSidecarCommand(stderr),
			newNodeCommand(stderr),
			newRulesCommand(stdout, stderr),
			newDoctorCommand(stdout, stderr),
			newReadyCommand(stderr),
			newInjectCommand(stdin, stdout, stderr),
			newWebhookCommand(stderr),
			newReportCommand(stdout, stderr),
			newVersionCommand(stdout, stderr),
		},
		Exec: subcommandsOnly("imds-proxy"),
	}
}

func newVersionCommand(stdout, stderr io.Writer) *ffcli.Command {
	return &ffcli.Command{
		Name:       "version",
		ShortUsage: "imds-proxy version",
		ShortHelp:  "print the version",
		FlagSet:    newFlagSet("imds-proxy version", stderr),
		Exec: flagsOnly("imds-proxy version", func(context.Context) error {
			_, err := fmt.Fprintln(stdout, "imds-proxy", version)
			return err
		}),
	}
}

// newFlagSet is a command's flag set, whose errors and usage go to stderr
// and end in an error rather than in os.Exit.
func newFlagSet(command string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(command, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// subcommandsOnly is the Exec of a command that only groups subcommands:
// alone it prints its usage, and a word that names none of them fails, so
// that a typo in a container's command is not a clean exit.
func subcommandsOnly(command string) func(context.Context, []string) error {
	return func(_ context.Context, args []string) error {
		if len(args) == 0 {
			return flag.ErrHelp
		}
		unknown := strings.TrimSpace(strings.TrimPrefix(command, "imds-proxy") + " " + args[0])
		return fmt.Errorf("unknown command %q; see %s --help", unknown, command)
	}
}

// flagsOnly is the Exec of a command that takes flags and no arguments: a
// stray argument fails rather than being ignored.
func flagsOnly(command string, run func(context.Context) error) func(context.Context, []string) error {
	return func(ctx context.Context, args []string) error {
		if len(args) > 0 {
			return fmt.Errorf("unexpected arguments %q; see %s --help", args, command)
		}
		return run(ctx)
	}
}

// parseOptions makes every flag settable from the environment and, for the
// serving commands, from a YAML --config file.
func parseOptions() []ff.Option {
	return []ff.Option{ff.WithEnvVarPrefix(envPrefix), ff.WithConfigFileFlag("config"), ff.WithConfigFileParser(ffyaml.Parser)}
}
