package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/peterbourgon/ff/v3/ffcli"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/iptables"
)

const envHelp = "\n\nEvery flag can also be set as " + envPrefix + "_<FLAG> (e.g. " + envPrefix + "_UPSTREAM); flags win."

func newSidecarCommand(stderr io.Writer) *ffcli.Command {
	return newServeCommand(imdsapi.ModeSidecar, fmt.Sprintf("127.0.0.1:%d", imdsapi.ProxyPort),
		"serve IMDS to the workloads of this network namespace (task or pod)",
		"Serves the IMDS API on --listen and forwards to --upstream. Inside a task's or pod's\n"+
			"network namespace, nat OUTPUT redirects 169.254.169.254:80 (and [fd00:ec2::254]:80)\n"+
			"to --listen; the proxy's own upstream connections carry --exempt-mark and pass.", stderr)
}

func newNodeCommand(stderr io.Writer) *ffcli.Command {
	return newServeCommand(imdsapi.ModeNode, fmt.Sprintf(":%d", imdsapi.ProxyPort),
		"serve IMDS to the containers of this host (host network namespace)",
		"Serves the IMDS API on --listen and forwards to --upstream. In the host network\n"+
			"namespace, nat PREROUTING redirects IMDS traffic arriving on --interfaces to the\n"+
			"listener, and filter INPUT drops connections to the listener from any other\n"+
			"interface, so it is never reachable from the VPC.", stderr)
}

func newServeCommand(mode imdsapi.Mode, defaultListen, short, long string, stderr io.Writer) *ffcli.Command {
	f, fs := newServeFlags(mode, defaultListen, stderr)
	return &ffcli.Command{
		Name:       string(mode),
		ShortUsage: "imds-proxy " + string(mode) + " [flags]",
		ShortHelp:  short,
		LongHelp:   long + envHelp,
		FlagSet:    fs,
		Options:    parseOptions(),
		Exec:       flagsOnly("imds-proxy "+string(mode), func(ctx context.Context) error { return serve(ctx, f, stderr) }),
	}
}

// newServeFlags are the flags of the serving command of mode.
func newServeFlags(mode imdsapi.Mode, defaultListen string, out io.Writer) (*serveFlags, *flag.FlagSet) {
	f := &serveFlags{ruleFlags: ruleFlags{mode: mode}}
	fs := newFlagSet("imds-proxy "+string(mode), out)
	f.register(fs, defaultListen)
	return f, fs
}

// addressRemoveIgnores is a documentation address (RFC 5737) standing in
// for the node address when rules are only removed.
const addressRemoveIgnores = "192.0.2.1"

// newRulesCommand is the one-shot rule tool for init containers and operators.
func newRulesCommand(stdout, stderr io.Writer) *ffcli.Command {
	action := func(name, help string) *ffcli.Command {
		var f ruleFlags
		var mode string
		var port int
		fs := newFlagSet("imds-proxy rules "+name, stderr)
		fs.StringVar(&mode, "mode", string(imdsapi.ModeSidecar), "sidecar or node")
		fs.IntVar(&port, "port", imdsapi.ProxyPort, "the proxy's listening port, the redirect target")
		f.register(fs)
		return &ffcli.Command{
			Name:       name,
			ShortUsage: "imds-proxy rules " + name + " [flags]",
			ShortHelp:  help,
			LongHelp:   help + envHelp,
			FlagSet:    fs,
			Options:    parseOptions(),
			Exec: flagsOnly("imds-proxy rules "+name, func(context.Context) error {
				f.mode = imdsapi.Mode(mode)
				if name == "remove" && f.nodeAddress == iptables.NodeAddressAuto {
					// Removal deletes the proxy's chains by name: it needs no
					// node address, and must work where none can be found.
					f.nodeAddress = addressRemoveIgnores
				}
				cfg, err := f.config(port, "", "")
				if err != nil {
					return err
				}
				return runRules(name, cfg, &f, stdout, stderr)
			}),
		}
	}
	return &ffcli.Command{
		Name:       "rules",
		ShortUsage: "imds-proxy rules <install|remove|show> [flags]",
		ShortHelp:  "install, remove or show the iptables redirect rules",
		FlagSet:    newFlagSet("imds-proxy rules", stderr),
		Subcommands: []*ffcli.Command{
			action("install", "install the redirect rules (needs NET_ADMIN); installing twice changes nothing"),
			action("remove", "remove exactly what install added (needs NET_ADMIN)"),
			action("show", "print the exact rules, iptables-save style (a dry run: needs no privileges)"),
		},
		Exec: subcommandsOnly("imds-proxy rules"),
	}
}

func runRules(action string, cfg iptables.Config, f *ruleFlags, stdout, stderr io.Writer) error {
	if action == "show" {
		for _, family := range f.families() {
			if _, err := io.WriteString(stdout, iptables.Build(cfg, family).Render()); err != nil {
				return err
			}
		}
		return nil
	}
	backend, err := f.parseBackend()
	if err != nil {
		return err
	}
	log, err := newLogger("console", "info", stderr)
	if err != nil {
		return err
	}
	m, err := iptables.NewManager(cfg, backend, f.families(), log)
	if err != nil {
		return err
	}
	if action == "install" {
		if err := m.Install(); err != nil {
			return err
		}
		if cfg.Mode == imdsapi.ModeSidecar {
			log.Warn("these rules exempt a socket mark or a UID, which an app container can take with NET_RAW (Linux 5.17+) "+
				"or CAP_SETUID, default capabilities of Docker and containerd; a sidecar that installs its own rules "+
				"exempts its cgroup instead", zap.Uint32("mark", cfg.ExemptMark), zap.Int("uid", cfg.ExemptUID))
		}
		// IPv6 IMDS left unredirected where the namespace routes to it is a
		// bypass: an init container must fail rather than let the pod start.
		return m.IPv6Bypass()
	}
	if err := m.Remove(); err != nil {
		return err
	}
	log.Info("iptables rules removed", zap.String("mode", string(cfg.Mode)))
	return nil
}
