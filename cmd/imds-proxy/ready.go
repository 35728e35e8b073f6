package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/imds-proxy/imds-proxy/doctor"
	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// newReadyCommand is the container health check (ECS healthCheck, docker
// run --health-cmd): the image has no curl.
func newReadyCommand(stderr io.Writer) *ffcli.Command {
	fs := newFlagSet("imds-proxy ready", stderr)
	url := fs.String("url", fmt.Sprintf("http://127.0.0.1:%d/readyz", imdsapi.AdminPort), "the proxy's readiness endpoint (its --metrics-listen)")
	timeout := fs.Duration("timeout", 2*time.Second, "give up after this long")
	return &ffcli.Command{
		Name:       "ready",
		ShortUsage: "imds-proxy ready [--url URL] [--timeout D]",
		ShortHelp:  "exit 0 if the local proxy is ready (rules installed, upstream decided), else 1: a container health check",
		LongHelp:   "Asks the proxy's /readyz; exit 0 if it answers 200, else 1 with the reason." + envHelp,
		FlagSet:    fs,
		Options:    parseOptions(),
		Exec: flagsOnly("imds-proxy ready", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, *timeout)
			defer cancel()
			return doctor.Ready(ctx, *url)
		}),
	}
}
