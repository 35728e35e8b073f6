package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/internal/serving"
	"github.com/imds-proxy/imds-proxy/iptables"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
	"github.com/imds-proxy/imds-proxy/workload"
)

// serve wires the proxy, its listeners, its rules and its admin endpoints
// together and runs them until ctx is cancelled (see serving.Set.Run for
// the shutdown order).
func serve(ctx context.Context, f *serveFlags, logOut io.Writer) error {
	log, err := newLogger(f.logFormat, f.logLevel, logOut)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	if err := f.validate(); err != nil {
		return err
	}
	exemption := iptables.Exemption{Mode: f.mode, Redirects: f.rules, Mark: uint32(f.exemptMark), UID: f.exemptUID}.
		WithOwnCgroup(f.exemptCgroup != exemptCgroupOff, iptables.OwnCgroup, log)
	f.ownCgroup = exemption.Cgroup
	workloads, err := workloadResolver(f, log)
	if err != nil {
		return err
	}
	p, reg, err := newProxy(f, exemption, workloads, log)
	if err != nil {
		return err
	}
	rules, err := newRules(f, reg, log)
	if err != nil {
		return err
	}
	servers, err := listenAPI(f, p, rules, log)
	if err != nil {
		return err
	}
	err = servers.ListenAdmin(f.metricsListen, proxy.NewAdminHandler(reg, p.V1Callers(), readiness(p, rules)...), log)
	if err == nil && f.pprofListen != "" {
		if err = servers.Listen("tcp", f.pprofListen, serving.NewHTTPServer(pprofHandler(), log), nil); err != nil {
			err = fmt.Errorf("--pprof-listen %s: %w", f.pprofListen, err)
		}
	}
	if err == nil && rules != nil {
		// After the listeners exist, so redirected traffic always finds one.
		err = rules.Install()
	}
	if err != nil {
		servers.Close()
		return err
	}
	log.Info("serving", zap.String("listen", servers.Addr(0)), zap.String("metrics_listen", servers.AdminAddr()),
		zap.String("upstream", f.upstream), zap.String("v1", f.v1), zap.String("version", version))
	runCtx, stopProxy := context.WithCancel(context.Background())
	defer stopProxy()
	go p.Run(runCtx)
	go workloads.Run(runCtx)
	lifecycle := serving.Lifecycle{Timeout: f.shutdownTimeout, Cleanup: stopProxy}
	if rules != nil {
		lifecycle.Reconcile = func(ctx context.Context) { rules.Reconcile(ctx, f.reconcile) }
		lifecycle.Cleanup = func() { stopProxy(); rules.RemoveOnExit(f.keepRules) }
	}
	return servers.Run(ctx, lifecycle, log)
}

// workloadResolver names the workloads behind the proxy's callers, from
// the platforms' sources that the flags (and, in an ECS task, the task
// metadata endpoint's variable) name.
func workloadResolver(f *serveFlags, log *zap.Logger) (*workload.Resolver, error) {
	if f.mode != imdsapi.ModeNode {
		if uri := os.Getenv(ecsTaskMetadataVariable); uri != "" {
			return workload.NewResolver(workload.NewECSTaskMetadata(uri, log)), nil
		}
		return nil, nil
	}
	var sources []workload.Source
	if f.nodeName != "" {
		kube, err := kubernetesSource(f, log)
		if err != nil {
			return nil, err
		}
		sources = append(sources, kube)
	}
	var docker *workload.Docker
	if f.dockerSocket != "" {
		docker = workload.NewDocker(f.dockerSocket, log)
	}
	if f.ecsIntrospection != "" {
		sources = append(sources, workload.NewECSIntrospection(f.ecsIntrospection, docker, log))
	}
	if docker != nil {
		sources = append(sources, docker)
	}
	if err := (attribution.Attributor{}).CanTrace(); err != nil {
		log.Warn("cannot see the processes of other network namespaces: callers are named by address and by what the "+
			"workload sources know of it; give the agent the host's PID namespace and CAP_SYS_PTRACE", zap.Error(err))
		return workload.NewResolver(sources...), nil
	}
	return workload.NewNodeResolver(attribution.Attributor{}, workload.DefaultCallerTTL, workload.DefaultScansPerSecond, sources...), nil
}

// ecsTaskMetadataVariable is set by the ECS agent in every container of a
// task: the task metadata endpoint v4.
const ecsTaskMetadataVariable = "ECS_CONTAINER_METADATA_URI_V4"

func newProxy(f *serveFlags, exemption iptables.Exemption, workloads *workload.Resolver, log *zap.Logger) (*proxy.Proxy, *prometheus.Registry, error) {
	cfg, err := f.proxyConfig()
	if err != nil {
		return nil, nil, err
	}
	cfg.Workloads = workloads
	if f.credentials == string(imdsapi.CredentialsWorkload) {
		if cfg.WorkloadRole, err = workloadRole(context.Background(), f.workloadRoleARN); err != nil {
			return nil, nil, fmt.Errorf("--credentials=workload: %w", err)
		}
		name, arn, source := cfg.WorkloadRole.Role()
		log.Info("the role path serves the workload's own role, never the instance's", zap.String("source", source),
			zap.String("role", name), zap.String("role_arn", arn))
	}
	if cfg.UpstreamDialControl, err = exemption.DialControl(log); err != nil {
		return nil, nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), exemption.Gauge())
	var minter *token.Minter
	if f.tokenKeyFile == "" {
		minter, err = token.NewRandomMinter()
	} else if minter, err = token.NewMinterFromKeyFile(f.tokenKeyFile, nil); err != nil {
		err = fmt.Errorf("--token-key-file: %w", err)
	} else {
		log.Info("client tokens are signed with the key in the key file, and survive restarts", zap.String("token_key_file", f.tokenKeyFile))
	}
	if err != nil {
		return nil, nil, err
	}
	p, err := proxy.New(cfg, log, reg, minter)
	return p, reg, err
}

func readiness(p *proxy.Proxy, rules *iptables.Manager) []func() error {
	if rules == nil {
		return []func() error{p.Ready}
	}
	return []func() error{p.Ready, rules.Ready}
}

// listenAPI binds --listen. A sidecar also listens on [::1] at the same
// port, where ip6tables REDIRECT delivers. If it cannot, it gives up its
// IPv6 rules, and it is not ready while the namespace routes IPv6 to IMDS.
// A node agent listening on a wildcard address binds only the families
// whose filter guard is installed, so the VPC never reaches it.
func listenAPI(f *serveFlags, p *proxy.Proxy, rules *iptables.Manager, log *zap.Logger) (*serving.Set, error) {
	api := iptables.APIListener{Mode: f.mode, Addr: f.listen, IPv6: f.ipv6, Redirects: rules != nil,
		RedirectsIPv6: rules != nil && rules.Manages(iptables.IPv6)}
	network, err := api.Network()
	if err != nil {
		return nil, err
	}
	s := &serving.Set{}
	srv, limit := p.Server()
	if err := s.Listen(network, f.listen, srv, limit); err != nil {
		return nil, fmt.Errorf("--listen %s: %w", f.listen, err)
	}
	if !api.WantsIPv6Loopback() {
		return s, nil
	}
	_, port, _ := net.SplitHostPort(s.Addr(0))
	addr := net.JoinHostPort("::1", port)
	if err := s.Listen("tcp", addr, srv, limit); err != nil {
		if rules == nil {
			// An init container's IPv6 redirect sends to a port nobody
			// listens on: IPv6 IMDS connections are refused, not leaked.
			log.Warn("IPv6 IMDS connections redirected to [::1] will be refused: cannot listen there", zap.String("addr", addr), zap.Error(err))
			return s, nil
		}
		rules.DropIPv6(fmt.Errorf("cannot listen on %s, where the IPv6 redirect delivers: %w; free that port on [::1], "+
			"or pass --ipv6=false to leave IPv6 IMDS unproxied", addr, err))
	}
	return s, nil
}

// pprofHandler serves Go's profiles (--pprof-listen).
func pprofHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// newLogger builds the zap logger for --log-format and --log-level.
func newLogger(format, level string, out io.Writer) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	switch format {
	case "json":
		enc = zapcore.NewJSONEncoder(encCfg)
	case "console":
		encCfg.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	default:
		return nil, fmt.Errorf("--log-format %q: want json or console", format)
	}
	return zap.New(zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(out)), lvl)), nil
}

// newRules returns the rule manager for --rules, or nil without it.
func newRules(f *serveFlags, reg prometheus.Registerer, log *zap.Logger) (*iptables.Manager, error) {
	if !f.rules {
		return nil, nil
	}
	backend, err := f.parseBackend()
	if err != nil {
		return nil, err
	}
	cfg, err := f.rulesConfig()
	if err != nil {
		return nil, err
	}
	return iptables.NewManager(cfg, backend, f.families(), log, iptables.WithMetrics(reg))
}
