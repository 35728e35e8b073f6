// Package serving runs a command's HTTP servers, the proxy's and the
// webhook's alike, and shuts them down in the order clients never notice.
package serving

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"
)

// listener is one bound HTTP server.
type listener struct {
	srv *http.Server
	ln  net.Listener
	// tls is decided when bound: serving a server sets its TLSConfig for
	// HTTP/2, and one server may serve several listeners.
	tls bool
}

// Set is a command's listeners: the API listeners, then the admin listener
// if any.
type Set struct {
	all   []listener
	admin int // 1 + the index of the admin listener; 0: none
}

// Listen binds addr and serves it with srv, through wrap if not nil; over
// TLS when srv has a TLSConfig.
func (s *Set) Listen(network, addr string, srv *http.Server, wrap func(net.Listener) net.Listener) error {
	ln, err := net.Listen(network, addr)
	if err != nil {
		return err
	}
	if wrap != nil {
		ln = wrap(ln)
	}
	s.all = append(s.all, listener{srv: srv, ln: ln, tls: srv.TLSConfig != nil})
	return nil
}

// ListenAdmin binds the admin listener, every command's --metrics-listen,
// on addr; "" binds none.
func (s *Set) ListenAdmin(addr string, h http.Handler, log *zap.Logger) error {
	if addr == "" {
		return nil
	}
	if err := s.Listen("tcp", addr, NewHTTPServer(h, log), nil); err != nil {
		return fmt.Errorf("--metrics-listen %s: %w", addr, err)
	}
	s.admin = len(s.all)
	return nil
}

// Addr is the address the i-th listener is bound to.
func (s *Set) Addr(i int) string { return s.all[i].ln.Addr().String() }

// AdminAddr is the admin listener's address, "" without one.
func (s *Set) AdminAddr() string {
	if s.admin == 0 {
		return ""
	}
	return s.Addr(s.admin - 1)
}

// Close closes the listeners of a set that never ran.
func (s *Set) Close() {
	for _, l := range s.all {
		l.ln.Close()
	}
}

// Lifecycle is what runs beside the servers of a Set, and after them.
type Lifecycle struct {
	// Reconcile, if not nil, runs beside the servers until its context
	// ends. It is stopped and waited for before the servers shut down, so
	// that it neither undoes Cleanup nor races it.
	Reconcile func(context.Context)
	// Timeout bounds how long requests in flight may take to finish.
	Timeout time.Duration
	// Cleanup, if not nil, runs once every client connection is closed.
	Cleanup func()
}

// Run serves until ctx ends or a server fails. Then it shuts down in the
// order clients never notice: it stops Reconcile, stops accepting, closes
// idle keep-alive connections and lets the requests in flight finish (each
// connection closed after its response), and closes what is left after
// Timeout; only then does it run Cleanup. The proxy's Cleanup removes its
// redirect rules. Removed first, the redirect may take the namespace's only
// NAT user with it: the closes the proxy sends after that go out
// untranslated and never reach the client, whose keep-alive socket stays
// open and whose next request is reset.
func (s *Set) Run(ctx context.Context, l Lifecycle, log *zap.Logger) error {
	reconcileCtx, cancelReconcile := context.WithCancel(context.Background())
	defer cancelReconcile()
	reconciled := make(chan struct{})
	go func() {
		defer close(reconciled)
		if l.Reconcile != nil {
			l.Reconcile(reconcileCtx)
		}
	}()
	var err error
	select {
	case <-ctx.Done():
		log.Info("shutting down: finishing in-flight requests", zap.Duration("timeout", l.Timeout))
	case err = <-s.start():
		log.Error("server failed", zap.Error(err))
	}
	start := time.Now()
	cancelReconcile()
	<-reconciled
	shutdownCtx, cancel := context.WithTimeout(context.Background(), l.Timeout)
	defer cancel()
	if shutdownErr := s.shutdown(shutdownCtx); shutdownErr != nil {
		// Past the timeout: close what is left before Cleanup, so those
		// clients see the close too.
		for _, l := range s.all {
			_ = l.srv.Close()
		}
		if err == nil {
			err = fmt.Errorf("shutting down: %w", shutdownErr)
		}
	}
	log.Info("client connections closed", zap.Duration("after", time.Since(start)))
	if l.Cleanup != nil {
		l.Cleanup()
	}
	log.Info("stopped", zap.Duration("after", time.Since(start)))
	return err
}

// start serves every listener, and reports each server that fails.
func (s *Set) start() <-chan error {
	errc := make(chan error, len(s.all))
	for _, l := range s.all {
		go func() {
			var err error
			if l.tls {
				err = l.srv.ServeTLS(l.ln, "", "")
			} else {
				err = l.srv.Serve(l.ln)
			}
			if !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("serving %s: %w", l.ln.Addr(), err)
			}
		}()
	}
	return errc
}

func (s *Set) shutdown(ctx context.Context) error {
	var errs []error
	for _, l := range s.all {
		errs = append(errs, l.srv.Shutdown(ctx))
	}
	return errors.Join(errs...)
}

// NewHTTPServer is the server of the admin, pprof and webhook listeners.
func NewHTTPServer(h http.Handler, log *zap.Logger) *http.Server {
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
