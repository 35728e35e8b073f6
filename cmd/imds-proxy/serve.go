package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/imds-proxy/imds-proxy/iptables"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// serve wires the proxy, its listeners, its rules and its admin endpoints
// together and runs them until ctx is cancelled (see run for the shutdown
// order).
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
	p, reg, err := newProxy(f, exemption, log)
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
	err = servers.listenAdmin(f.metricsListen, proxy.NewAdminHandler(reg, p.V1Callers(), readiness(p, rules)...), log)
	if err == nil && f.pprofListen != "" {
		if err = servers.listen("tcp", f.pprofListen, newHTTPServer(pprofHandler(), log), nil); err != nil {
			err = fmt.Errorf("--pprof-listen %s: %w", f.pprofListen, err)
		}
	}
	if err == nil && rules != nil {
		// After the listeners exist, so redirected traffic always finds one.
		err = rules.Install()
	}
	if err != nil {
		servers.close()
		return err
	}
	log.Info("serving", zap.String("listen", servers.addr(0)), zap.String("metrics_listen", servers.adminAddr()),
		zap.String("upstream", f.upstream), zap.String("v1", f.v1), zap.String("version", version))
	return run(ctx, f, p, rules, servers, log)
}

// run serves until ctx ends or a server fails. Then it shuts down in the
// order clients never notice: it stops the reconcile loop, stops accepting,
// closes idle keep-alive connections and lets the requests in flight finish
// (each connection closed after its response), all while the rules still
// translate the replies; only then does it remove the rules. Removed first,
// the redirect may take the namespace's only NAT user with it: the closes
// the proxy sends after that go out untranslated and never reach the
// client, whose keep-alive socket stays open and whose next request is
// reset.
func run(ctx context.Context, f *serveFlags, p *proxy.Proxy, rules *iptables.Manager, servers *serverSet, log *zap.Logger) error {
	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	go p.Run(runCtx)
	reconcileCtx, cancelReconcile := context.WithCancel(runCtx)
	defer cancelReconcile()
	reconciled := make(chan struct{})
	go func() {
		defer close(reconciled)
		if rules != nil {
			rules.Reconcile(reconcileCtx, f.reconcile)
		}
	}()
	var err error
	select {
	case <-ctx.Done():
		log.Info("shutting down: finishing in-flight requests", zap.Duration("timeout", f.shutdownTimeout))
	case err = <-servers.start():
		log.Error("server failed", zap.Error(err))
	}
	start := time.Now()
	// Reconcile first: it must not reinstall what is removed below, nor
	// race the removal.
	cancelReconcile()
	<-reconciled
	shutdownCtx, cancel := context.WithTimeout(context.Background(), f.shutdownTimeout)
	defer cancel()
	if shutdownErr := servers.shutdown(shutdownCtx); shutdownErr != nil {
		// Past --shutdown-timeout: close what is left while the rules
		// still translate, so those clients see the close too.
		for _, l := range servers.all {
			_ = l.srv.Close()
		}
		if err == nil {
			err = fmt.Errorf("shutting down: %w", shutdownErr)
		}
	}
	log.Info("client connections closed", zap.Duration("after", time.Since(start)))
	cancelRun()
	if rules != nil {
		removeRules(rules, f.keepRules, log)
	}
	log.Info("stopped", zap.Duration("after", time.Since(start)))
	return err
}

func newProxy(f *serveFlags, exemption iptables.Exemption, log *zap.Logger) (*proxy.Proxy, *prometheus.Registry, error) {
	cfg, err := f.proxyConfig()
	if err != nil {
		return nil, nil, err
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

// listener is one bound HTTP server.
type listener struct {
	srv *http.Server
	ln  net.Listener
}

// serverSet is the API listeners, then the admin listener if any.
type serverSet struct {
	all   []listener
	admin int // 1 + the index of the admin listener; 0: none
}

// listenAPI binds --listen. A sidecar also listens on [::1] at the same
// port, where ip6tables REDIRECT delivers. If it cannot, it gives up its
// IPv6 rules, and it is not ready while the namespace routes IPv6 to IMDS.
// A node agent listening on a wildcard address binds only the families
// whose filter guard is installed, so the VPC never reaches it.
func listenAPI(f *serveFlags, p *proxy.Proxy, rules *iptables.Manager, log *zap.Logger) (*serverSet, error) {
	api := iptables.APIListener{Mode: f.mode, Addr: f.listen, IPv6: f.ipv6, Redirects: rules != nil,
		RedirectsIPv6: rules != nil && rules.Manages(iptables.IPv6)}
	network, err := api.Network()
	if err != nil {
		return nil, err
	}
	s := &serverSet{}
	srv, limit := p.Server()
	if err := s.listen(network, f.listen, srv, limit); err != nil {
		return nil, fmt.Errorf("--listen %s: %w", f.listen, err)
	}
	if !api.WantsIPv6Loopback() {
		return s, nil
	}
	_, port, _ := net.SplitHostPort(s.addr(0))
	addr := net.JoinHostPort("::1", port)
	if err := s.listen("tcp", addr, srv, limit); err != nil {
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

// listen binds addr and serves it with srv, through wrap if not nil.
func (s *serverSet) listen(network, addr string, srv *http.Server, wrap func(net.Listener) net.Listener) error {
	ln, err := net.Listen(network, addr)
	if err != nil {
		return err
	}
	if wrap != nil {
		ln = wrap(ln)
	}
	s.all = append(s.all, listener{srv: srv, ln: ln})
	return nil
}

func (s *serverSet) listenAdmin(addr string, h http.Handler, log *zap.Logger) error {
	if addr == "" {
		return nil
	}
	if err := s.listen("tcp", addr, newHTTPServer(h, log), nil); err != nil {
		return fmt.Errorf("--metrics-listen %s: %w", addr, err)
	}
	s.admin = len(s.all)
	return nil
}

func (s *serverSet) addr(i int) string { return s.all[i].ln.Addr().String() }

func (s *serverSet) adminAddr() string {
	if s.admin == 0 {
		return ""
	}
	return s.addr(s.admin - 1)
}

func (s *serverSet) close() {
	for _, l := range s.all {
		l.ln.Close()
	}
}

func (s *serverSet) start() <-chan error {
	errc := make(chan error, len(s.all))
	for _, l := range s.all {
		go func() {
			if err := l.srv.Serve(l.ln); !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("serving %s: %w", l.ln.Addr(), err)
			}
		}()
	}
	return errc
}

func (s *serverSet) shutdown(ctx context.Context) error {
	var errs []error
	for _, l := range s.all {
		errs = append(errs, l.srv.Shutdown(ctx))
	}
	return errors.Join(errs...)
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

// newHTTPServer is the server of the admin and webhook listeners.
func newHTTPServer(h http.Handler, log *zap.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          zap.NewStdLog(log.Named("http")),
	}
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

func removeRules(rules *iptables.Manager, keep bool, log *zap.Logger) {
	if keep {
		log.Info("leaving iptables rules in place (--keep-rules-on-exit)")
		return
	}
	if err := rules.Remove(); err != nil {
		log.Error("removing iptables rules", zap.Error(err))
		return
	}
	log.Info("iptables rules removed")
}
