package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/imds-proxy/imds-proxy/inject"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// injectFlags choose the sidecar that `inject` and `webhook` add.
type injectFlags struct {
	image       string
	port        int
	metricsPort int
	v1          string
	upstream    string
}

func (f *injectFlags) register(fs *flag.FlagSet) {
	d := inject.DefaultOptions()
	fs.StringVar(&f.image, "image", d.Image, "the sidecar's image")
	fs.IntVar(&f.port, "port", d.Port, "the sidecar's IMDS port on 127.0.0.1 and [::1] (the redirect target)")
	fs.IntVar(&f.metricsPort, "metrics-port", d.MetricsPort, "the sidecar's /metrics, /healthz and /readyz port (Kubernetes: on the pod IP, for the probes)")
	fs.StringVar(&f.v1, "v1", string(d.V1), "the sidecar's IMDSv1 policy: allow, warn or block (a pod's "+inject.V1Key+" annotation overrides it)")
	fs.StringVar(&f.upstream, "upstream", "", "the sidecar's upstream, e.g. a node agent (default: IMDS)")
}

func (f *injectFlags) options() (inject.Options, error) {
	o := inject.Options{Image: f.image, Port: f.port, MetricsPort: f.metricsPort, V1: proxy.V1Policy(f.v1), Upstream: f.upstream}
	return o, o.Validate()
}

func newInjectCommand(stdin io.Reader, stdout, stderr io.Writer) *ffcli.Command {
	return &ffcli.Command{
		Name:       "inject",
		ShortUsage: "imds-proxy inject <k8s|ecs> [flags] [file]",
		ShortHelp:  "add the sidecar to Kubernetes manifests or an ECS task definition",
		Subcommands: []*ffcli.Command{
			injectCommand("k8s", "add the native sidecar to every workload in a YAML stream",
				"Reads a multi-document YAML stream (a file, or stdin with no file or -) and writes it\n"+
					"to stdout with the sidecar added to every Pod, Deployment, StatefulSet, DaemonSet,\n"+
					"ReplicaSet, Job and CronJob. Other documents are copied byte for byte, as are\n"+
					"workloads that already have the sidecar (injecting twice changes nothing), opt out\n"+
					"("+inject.InjectKey+": "+inject.Disabled+" annotation or label) or use the host network;\n"+
					"skips are noted on stderr. The native sidecar needs Kubernetes 1.29 or newer.",
				stdin, stdout, stderr, injectK8s),
			injectCommand("ecs", "add the sidecar to an awsvpc task definition (register-task-definition JSON)",
				"Reads a task definition as accepted by `aws ecs register-task-definition\n"+
					"--cli-input-json` and writes it with the sidecar as the first container; every\n"+
					"other container waits until the sidecar is HEALTHY. Only networkMode awsvpc is\n"+
					"accepted: bridge and host tasks share the instance's network namespace, where the\n"+
					"node agent (imds-proxy node) serves them.",
				stdin, stdout, stderr, injectECS),
		},
		Exec: func(context.Context, []string) error { return flag.ErrHelp },
	}
}

type injector func(in []byte, o inject.Options, stdout, stderr io.Writer) error

func injectCommand(name, short, long string, stdin io.Reader, stdout, stderr io.Writer, run injector) *ffcli.Command {
	var f injectFlags
	fs := flag.NewFlagSet("imds-proxy inject "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	f.register(fs)
	return &ffcli.Command{
		Name:       name,
		ShortUsage: "imds-proxy inject " + name + " [flags] [file|-]",
		ShortHelp:  short,
		LongHelp:   long + envHelp,
		FlagSet:    fs,
		Options:    parseOptions(),
		Exec: func(_ context.Context, args []string) error {
			o, err := f.options()
			if err != nil {
				return err
			}
			in, err := readInput(args, stdin)
			if err != nil {
				return err
			}
			return run(in, o, stdout, stderr)
		},
	}
}

// readInput reads the one file named in args, or stdin.
func readInput(args []string, stdin io.Reader) ([]byte, error) {
	switch {
	case len(args) > 1:
		return nil, fmt.Errorf("one input file at most, got %q", args)
	case len(args) == 0 || args[0] == "-":
		return io.ReadAll(stdin)
	}
	return os.ReadFile(args[0])
}

func injectK8s(in []byte, o inject.Options, stdout, stderr io.Writer) error {
	out, notes, err := inject.Kubernetes(in, o)
	if err != nil {
		return err
	}
	for _, note := range notes {
		fmt.Fprintln(stderr, "imds-proxy inject:", note)
	}
	_, err = stdout.Write(out)
	return err
}

func injectECS(in []byte, o inject.Options, stdout, _ io.Writer) error {
	out, err := inject.ECSTaskDefinition(in, o)
	if err != nil {
		return err
	}
	_, err = stdout.Write(out)
	return err
}
