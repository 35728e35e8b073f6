package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/inject"
)

// injectFlags choose the sidecar that `inject` and `webhook` add, and the
// policy that a pod's own choices may not override.
type injectFlags struct {
	image            string
	port             int
	metricsPort      int
	v1               string
	v1Floor          string
	upstream         string
	exemptUID        int64
	onViolation      string
	optOutNamespaces string
	credentials      string
}

// register adds the flags; forPods adds those that only pods have (the
// annotation, namespaces).
func (f *injectFlags) register(fs *flag.FlagSet, forPods bool) {
	d := inject.DefaultOptions()
	fs.StringVar(&f.image, "image", d.Image, "the sidecar's image")
	fs.IntVar(&f.port, "port", d.Port, "the sidecar's IMDS port on 127.0.0.1 and [::1] (the redirect target)")
	fs.StringVar(&f.upstream, "upstream", "", "the sidecar's upstream, e.g. a node agent (default: IMDS)")
	if !forPods {
		fs.StringVar(&f.credentials, "credentials", string(imdsapi.CredentialsInstance), "whose role the sidecar serves on the IMDS role path: "+
			"instance, or workload (the task role, never the instance's: the sidecar runs "+inject.WorkloadRoleCommand+
			" with --workload-role-arn of the task definition's taskRoleArn, which it must have)")
		fs.IntVar(&f.metricsPort, "metrics-port", d.MetricsPort, "the sidecar's /metrics, /healthz and /readyz port (on 127.0.0.1, for the health check)")
		fs.StringVar(&f.v1, "v1", string(d.V1), "the sidecar's IMDSv1 policy: auto, allow, warn or block (raised to --v1-floor)")
		fs.StringVar(&f.v1Floor, "v1-floor", "", "the loosest IMDSv1 policy allowed, in the order allow < warn < auto < block (default: --v1); "+
			"the --v1 of a sidecar the task definition already has is raised to it")
		fs.StringVar(&f.onViolation, "on-violation", string(inject.Warn), "warn or deny: what becomes of a task definition "+
			"with a container named "+inject.ContainerName+" that is not exactly the sidecar (warn: written unchanged, with a note "+
			"on stderr), or with a container that could bypass the sidecar: privileged, adding NET_ADMIN, or any in a task "+
			"with pidMode task or host (warn: injected, with a note on stderr); deny: exit status 1")
		return
	}
	fs.StringVar(&f.onViolation, "on-violation", string(inject.Warn), "warn or deny: what becomes of a pod that would run "+
		"without the sidecar, or with a container that could bypass it, outside --allow-opt-out-namespaces "+
		"(webhook, warn: admitted with a warning; deny: refused. inject, warn: a note on stderr; deny: exit status 1)")
	fs.Int64Var(&f.exemptUID, "exempt-uid", d.ExemptUID, "the UID the rules of the sidecar-init variant "+
		"(deploy/kubernetes/sidecar-init) exempt: a pod's variant is the sidecar only if its "+inject.RulesContainerName+
		" container exempts this UID, else it is a container named "+inject.ContainerName+" that is not the sidecar; 0: no variant is")
	fs.IntVar(&f.metricsPort, "metrics-port", d.MetricsPort, "the sidecar's /metrics, /healthz and /readyz port (on the pod IP, for the probes)")
	fs.StringVar(&f.v1, "v1", string(d.V1), "the sidecar's IMDSv1 policy: auto, allow, warn or block (raised to --v1-floor), "+
		"unless a pod's "+inject.V1Key+" annotation chooses another at or above --v1-floor")
	fs.StringVar(&f.v1Floor, "v1-floor", "", "the loosest IMDSv1 policy a pod may get, in the order allow < warn < auto < block "+
		"(default: --v1, so that an "+inject.V1Key+" annotation can only tighten it; set it lower, e.g. allow, to let pods loosen it); "+
		"a looser "+inject.V1Key+" annotation, or --v1 of a sidecar the pod already has, is raised to it")
	fs.StringVar(&f.optOutNamespaces, "allow-opt-out-namespaces", "", "comma-separated namespaces whose pods may run "+
		"without the sidecar (* for all). Elsewhere a pod that would is a violation: opted out ("+inject.InjectKey+": "+
		inject.Disabled+"), hostNetwork, clashing with the sidecar's ports or volume, or with a container named "+
		inject.ContainerName+" that is not exactly the sidecar. Here a pod with a container that could bypass the "+
		"sidecar gets it with a warning")
}

func (f *injectFlags) options() (inject.Options, error) {
	o := inject.Options{Image: f.image, Port: f.port, MetricsPort: f.metricsPort, V1: imdsapi.V1Policy(f.v1), Upstream: f.upstream,
		ExemptUID: f.exemptUID, Policy: inject.Policy{V1Floor: imdsapi.V1Policy(f.v1Floor), OnViolation: inject.OnViolation(f.onViolation)}}
	if f.credentials != "" {
		c, err := imdsapi.ParseCredentials(f.credentials)
		if err != nil {
			return o, fmt.Errorf("--credentials: %w", err)
		}
		o.Credentials = c
	}
	for _, ns := range strings.Split(f.optOutNamespaces, ",") {
		if ns = strings.TrimSpace(ns); ns != "" {
			o.Policy.OptOutNamespaces = append(o.Policy.OptOutNamespaces, ns)
		}
	}
	return o, o.Validate()
}

func newInjectCommand(stdin io.Reader, stdout, stderr io.Writer) *ffcli.Command {
	return &ffcli.Command{
		Name:       "inject",
		ShortUsage: "imds-proxy inject <k8s|ecs> [flags] [file]",
		ShortHelp:  "add the sidecar to Kubernetes manifests or an ECS task definition",
		FlagSet:    newFlagSet("imds-proxy inject", stderr),
		Subcommands: []*ffcli.Command{
			injectCommand("k8s", "add the native sidecar to every workload in a YAML stream",
				"Reads a multi-document YAML stream (a file, or stdin with no file or -) and writes it\n"+
					"to stdout with the sidecar added to every Pod, Deployment, StatefulSet, DaemonSet,\n"+
					"ReplicaSet, Job and CronJob, deciding as the webhook does (a workload's namespace is\n"+
					"its metadata.namespace). Other documents are copied byte for byte, as are workloads\n"+
					"that already have the sidecar (injecting twice changes nothing; --v1-floor, by default\n"+
					"--v1, may raise their --v1; the sidecar-init variant counts only with --exempt-uid),\n"+
					"opt out ("+inject.InjectKey+": "+inject.Disabled+" annotation or label), use the host network,\n"+
					"clash with the sidecar's ports or volume, or have a container named "+inject.ContainerName+"\n"+
					"that is not exactly the sidecar. Skips and violations (see --allow-opt-out-namespaces)\n"+
					"are noted on stderr, and so are containers that could bypass the sidecar (privileged\n"+
					"or NET_ADMIN; in the sidecar-init variant, able to become its exempt UID), which\n"+
					"--on-violation=deny refuses outside --allow-opt-out-namespaces.\n"+
					"A pod annotated "+imdsapi.CredentialsKey+": workload gets a sidecar that serves its own\n"+
					"role (IRSA or EKS Pod Identity) on the IMDS role path, never the node's: it runs\n"+
					inject.WorkloadRoleCommand+" --credentials=workload, with its app containers' source.\n"+
					"The native sidecar needs Kubernetes 1.29 or newer.",
				true, stdin, stdout, stderr, injectK8s),
			injectCommand("ecs", "add the sidecar to an awsvpc task definition (register-task-definition JSON)",
				"Reads a task definition as accepted by `aws ecs register-task-definition\n"+
					"--cli-input-json` and writes it with the sidecar as the first container; every\n"+
					"other container waits until the sidecar is HEALTHY. Only networkMode awsvpc is\n"+
					"accepted: bridge and host tasks share the instance's network namespace, where the\n"+
					"node agent (imds-proxy node) serves them. A task definition that already has the\n"+
					"sidecar keeps it, its --v1 raised to --v1-floor (by default --v1). Violations\n"+
					"(--on-violation): a container named "+inject.ContainerName+" that is not exactly the sidecar,\n"+
					"and containers that could bypass it: privileged, adding NET_ADMIN, or any in a task\n"+
					"with pidMode task or host (they can signal the sidecar, which removes its redirect\n"+
					"on SIGTERM). --credentials workload serves the task role on the IMDS role path.",
				false, stdin, stdout, stderr, injectECS),
		},
		Exec: subcommandsOnly("imds-proxy inject"),
	}
}

type injector func(in []byte, o inject.Options, stdout, stderr io.Writer) error

func injectCommand(name, short, long string, forPods bool, stdin io.Reader, stdout, stderr io.Writer, run injector) *ffcli.Command {
	var f injectFlags
	fs := newFlagSet("imds-proxy inject "+name, stderr)
	f.register(fs, forPods)
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

func injectECS(in []byte, o inject.Options, stdout, stderr io.Writer) error {
	out, notes, err := inject.ECS(in, o)
	if err != nil {
		return err
	}
	for _, note := range notes {
		fmt.Fprintln(stderr, "imds-proxy inject:", note)
	}
	_, err = stdout.Write(out)
	return err
}
