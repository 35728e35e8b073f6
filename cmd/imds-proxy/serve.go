package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/imds-proxy/imds-proxy/iptables"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/token"
)

// serve wires the proxy, its listeners and its admin endpoints together and
// runs them until ctx is cancelled, then drains in-flight requests.
func serve(ctx context.Context, f *serveFlags, logOut io.Writer) error {
	log, err := newLogger(f.logFormat, f.logLevel, logOut)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	cfg, err := f.proxyConfig()
	if err != nil {
		return err
	}
	if cfg.UpstreamDialControl, err = exemptionControl(f, log); err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	minter, err := token.NewRandomMinter()
	if err != nil {
		return err
	}
	p, err := proxy.New(cfg, log, reg, minter)
	if err != nil {
		return err
	}
	rules, err := newRules(f, log)
	if err != nil {
		return err
	}
	readiness := []func() error{p.Ready}
	if rules != nil {
		readiness = append(readiness, rules.Ready)
	}
	servers, err := listenAll(f, p, proxy.NewAdminHandler(reg, readiness...), log)
	if err != nil {
		return err
	}
	if rules != nil {
		// After the listener exists, so redirected traffic always finds it.
		if err := rules.Install(); err != nil {
			servers.close()
			return err
		}
		defer removeRules(rules, f.keepRules, log)
	}
	log.Info("serving", zap.String("listen", servers.api.addr), zap.String("metrics_listen", servers.admin.addr),
		zap.String("upstream", cfg.Upstream.String()), zap.String("v1", string(cfg.V1)),
		zap.Bool("upstream_v1_fallback", cfg.UpstreamV1Fallback), zap.String("version", version))

	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	go p.Run(runCtx)
	if rules != nil {
		go rules.Reconcile(runCtx, f.reconcile)
	}
	errc := servers.start()
	select {
	case <-ctx.Done():
		log.Info("shutting down: finishing in-flight requests", zap.Duration("timeout", f.shutdownTimeout))
	case err = <-errc:
		log.Error("server failed", zap.Error(err))
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), f.shutdownTimeout)
	defer cancel()
	if shutdownErr := servers.shutdown(shutdownCtx); shutdownErr != nil && err == nil {
		err = fmt.Errorf("shutting down: %w", shutdownErr)
	}
	log.Info("stopped")
	return err
}

// listener is one bound HTTP server.
type listener struct {
	srv  *http.Server
	ln   net.Listener
	addr string
}

type serverSet struct{ api, admin listener }

func listenAll(f *serveFlags, api, admin http.Handler, log *zap.Logger) (*serverSet, error) {
	apiLn, err := net.Listen("tcp", f.listen)
	if err != nil {
		return nil, fmt.Errorf("--listen %s: %w", f.listen, err)
	}
	s := &serverSet{api: listener{srv: newHTTPServer(api, log), ln: apiLn, addr: apiLn.Addr().String()}}
	if f.metricsListen == "" {
		return s, nil
	}
	adminLn, err := net.Listen("tcp", f.metricsListen)
	if err != nil {
		apiLn.Close()
		return nil, fmt.Errorf("--metrics-listen %s: %w", f.metricsListen, err)
	}
	s.admin = listener{srv: newHTTPServer(admin, log), ln: adminLn, addr: adminLn.Addr().String()}
	return s, nil
}

func (s *serverSet) close() {
	for _, l := range s.each() {
		l.ln.Close()
	}
}

func (s *serverSet) each() []listener {
	if s.admin.srv == nil {
		return []listener{s.api}
	}
	return []listener{s.api, s.admin}
}

func (s *serverSet) start() <-chan error {
	errc := make(chan error, 2)
	for _, l := range s.each() {
		go func() {
			if err := l.srv.Serve(l.ln); !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("serving %s: %w", l.addr, err)
			}
		}()
	}
	return errc
}

func (s *serverSet) shutdown(ctx context.Context) error {
	var errs []error
	for _, l := range s.each() {
		errs = append(errs, l.srv.Shutdown(ctx))
	}
	return errors.Join(errs...)
}

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

// exemptionControl marks the proxy's upstream sockets when it may, so the
// sidecar redirect lets them through. Without NET_ADMIN the rules need
// --exempt-uid instead.
func exemptionControl(f *serveFlags, log *zap.Logger) (func(string, string, syscall.RawConn) error, error) {
	if f.exemptMark == 0 {
		return nil, nil
	}
	mark := uint32(f.exemptMark)
	if err := iptables.CanMark(mark); err != nil {
		if f.rules && f.exemptUID < 0 {
			return nil, fmt.Errorf("--rules: %w; give the proxy NET_ADMIN, or run it as a dedicated UID with --exempt-uid", err)
		}
		log.Info("upstream connections are not marked", zap.Error(err))
		return nil, nil
	}
	return iptables.MarkControl(mark), nil
}

// newRules returns the rule manager for --rules, or nil without it.
func newRules(f *serveFlags, log *zap.Logger) (*iptables.Manager, error) {
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
	return iptables.NewManager(cfg, backend, f.families(), log)
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
