package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

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
	servers, err := listenAll(f, p, proxy.NewAdminHandler(reg, p.Ready), log)
	if err != nil {
		return err
	}
	log.Info("serving", zap.String("listen", servers.api.addr), zap.String("metrics_listen", servers.admin.addr),
		zap.String("upstream", cfg.Upstream.String()), zap.String("v1", string(cfg.V1)),
		zap.Bool("upstream_v1_fallback", cfg.UpstreamV1Fallback), zap.String("version", version))

	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	go p.Run(runCtx)
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
