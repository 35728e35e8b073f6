package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// ServerLimits bound what clients can hold of a proxy listener, so that
// slow or hostile clients (slowloris, huge headers, endless bodies) cannot
// starve the workloads' SDKs.
type ServerLimits struct {
	// ReadHeaderTimeout closes a connection whose request headers take
	// longer (slowloris), ReadTimeout one whose request takes longer;
	// IdleTimeout closes idle keep-alive connections; WriteTimeout bounds
	// one whole exchange.
	ReadHeaderTimeout, ReadTimeout, IdleTimeout, WriteTimeout time.Duration
	// MaxHeaderBytes: larger request lines plus headers get 431.
	MaxHeaderBytes int
	// MaxBodyBytes: larger request bodies get 413 (IMDS requests have none).
	MaxBodyBytes int64
	// MaxConnections: connections beyond it get 503 and are closed (0: no
	// limit). MaxConnectionsPerClient bounds those of one client address, so
	// that one container cannot hold a node agent's every connection (0: no
	// limit, right for a sidecar, whose every client is 127.0.0.1).
	MaxConnections, MaxConnectionsPerClient int
}

// DefaultServerLimits are the serving commands' limits.
func DefaultServerLimits() ServerLimits {
	return ServerLimits{ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, IdleTimeout: 90 * time.Second, WriteTimeout: 30 * time.Second,
		MaxHeaderBytes: 16 << 10, MaxBodyBytes: 4 << 10, MaxConnections: 4096}
}

// Server returns the server for the proxy's listeners, within
// Config.Limits, and wraps each listener given to it in the connection
// limit. Refused connections and connections closed before a request
// (slowloris, read-header timeouts) are counted.
func (p *Proxy) Server() (srv *http.Server, limit func(net.Listener) net.Listener) {
	limits := p.cfg.Limits
	srv = &http.Server{
		Handler:           p,
		ReadHeaderTimeout: limits.ReadHeaderTimeout,
		ReadTimeout:       limits.ReadTimeout,
		IdleTimeout:       limits.IdleTimeout,
		WriteTimeout:      limits.WriteTimeout,
		// net/http's own bound, with room: the handler answers 431 itself,
		// counted, for anything between MaxHeaderBytes and this.
		MaxHeaderBytes: 2 * limits.MaxHeaderBytes,
		ErrorLog:       zap.NewStdLog(p.log.Named("http")),
	}
	watch := newConnWatch(p.metrics)
	srv.ConnContext, srv.ConnState = watch.context, watch.observe
	// Shared: the limit is the proxy's, not each listener's.
	counts := newConnCounts(limits.MaxConnections, limits.MaxConnectionsPerClient, p.metrics.connectionsOpen.Set)
	refusing := new(atomic.Int64)
	limit = func(ln net.Listener) net.Listener {
		return &limitListener{Listener: ln, counts: counts, refusing: refusing, rejected: p.metrics.connectionsRejected.Inc}
	}
	return srv, limit
}

// enforceRequestLimits answers requests on connections past the connection
// limits (503) and requests beyond the header and body limits, and reports
// whether it did. On the way it marks the connection as having carried a
// request, and reads any body there is.
func (p *Proxy) enforceRequestLimits(w http.ResponseWriter, r *http.Request) bool {
	if markServed(r) {
		w.Header().Set("Connection", "close")
		w.Header().Set("Retry-After", "1")
		p.refuse(w, r, http.StatusServiceUnavailable, outcomeTooManyConnections)
		return true
	}
	if p.cfg.Limits.MaxHeaderBytes > 0 && headerBytes(r) > p.cfg.Limits.MaxHeaderBytes {
		p.refuse(w, r, http.StatusRequestHeaderFieldsTooLarge, outcomeHeaderTooLarge)
		return true
	}
	if r.ContentLength == 0 {
		return false
	}
	// IMDS requests carry no body; read any there is (up to the limit) now,
	// inside the handler, so that net/http never finds it half read after.
	limit := p.cfg.Limits.MaxBodyBytes
	if limit <= 0 {
		limit = DefaultServerLimits().MaxBodyBytes
	}
	n, _ := io.CopyN(io.Discard, r.Body, limit+1)
	if n <= limit && r.ContentLength <= limit {
		return false
	}
	w.Header().Set("Connection", "close") // the rest of the body is not read
	p.refuse(w, r, http.StatusRequestEntityTooLarge, outcomeBodyTooLarge)
	return true
}

func (p *Proxy) refuse(w http.ResponseWriter, r *http.Request, status int, outcome string) {
	x := newExchange(r)
	x.outcome = outcome
	w.Header().Set(proxyHeader, p.shapeName()) // as on every answer: a chained proxy does not retry it
	http.Error(w, http.StatusText(status), status)
	p.record(x, r, status)
}

// headerBytes is the size of the request line and headers as sent.
func headerBytes(r *http.Request) int {
	n := len(r.Method) + len(r.RequestURI) + len(r.Proto) + 4
	for name, values := range r.Header {
		for _, v := range values {
			n += len(name) + len(v) + 4
		}
	}
	return n
}

// limitListener marks connections beyond the limits: their one request is
// answered 503 (Connection: close) rather than left queued, where clients
// only see a timeout. At most maxRefusing such connections are open at a
// time; past that they are closed unanswered.
type limitListener struct {
	net.Listener
	counts   *connCounts
	refusing *atomic.Int64
	rejected func()
}

// maxRefusing bounds the connections held only to be answered 503; each
// lives until its request arrives or the read-header timeout.
const maxRefusing = 256

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		client := clientAddr(c)
		if l.counts.acquire(client) {
			return &countedConn{Conn: c, release: func() { l.counts.release(client) }}, nil
		}
		l.rejected()
		if l.refusing.Add(1) <= maxRefusing {
			return &countedConn{Conn: c, overLimit: true, release: func() { l.refusing.Add(-1) }}, nil
		}
		l.refusing.Add(-1)
		_ = c.Close()
	}
}

func clientAddr(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// connCounts counts open connections in all and per client address.
type connCounts struct {
	max, maxPerClient int
	open              func(float64) // told the total after every change
	mu                sync.Mutex
	total             int
	perClient         map[netip.Addr]int
}

func newConnCounts(max, maxPerClient int, open func(float64)) *connCounts {
	return &connCounts{max: max, maxPerClient: maxPerClient, open: open, perClient: map[netip.Addr]int{}}
}

// acquire counts a new connection from client, unless a limit is reached.
func (c *connCounts) acquire(client netip.Addr) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.max > 0 && c.total >= c.max || c.maxPerClient > 0 && c.perClient[client] >= c.maxPerClient {
		return false
	}
	c.total++
	c.perClient[client]++
	c.open(float64(c.total))
	return true
}

func (c *connCounts) release(client netip.Addr) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total--
	if c.perClient[client]--; c.perClient[client] <= 0 {
		delete(c.perClient, client)
	}
	c.open(float64(c.total))
}

type countedConn struct {
	net.Conn
	overLimit bool // accepted past a limit: its request gets 503
	once      sync.Once
	release   func()
}

func (c *countedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

// connWatch counts connections that close before a request reached the
// proxy: read-header timeouts (slowloris), requests net/http refused as
// malformed, clients that connected and left.
type connWatch struct {
	mu    sync.Mutex
	conns map[net.Conn]*connRecord
	m     *metrics
}

// connRecord is what a request's context carries about its connection.
type connRecord struct {
	served    atomic.Bool
	overLimit bool
}

type connRecordKey struct{}

func newConnWatch(m *metrics) *connWatch {
	return &connWatch{conns: map[net.Conn]*connRecord{}, m: m}
}

// context is the server's ConnContext: it hands the connection's record to
// its requests.
func (w *connWatch) context(ctx context.Context, c net.Conn) context.Context {
	rec := &connRecord{}
	if cc, ok := c.(*countedConn); ok {
		rec.overLimit = cc.overLimit
	}
	w.mu.Lock()
	w.conns[c] = rec
	w.mu.Unlock()
	return context.WithValue(ctx, connRecordKey{}, rec)
}

func (w *connWatch) observe(c net.Conn, state http.ConnState) {
	if state != http.StateClosed && state != http.StateHijacked {
		return
	}
	w.mu.Lock()
	rec, ok := w.conns[c]
	delete(w.conns, c)
	w.mu.Unlock()
	if ok && !rec.served.Load() {
		w.m.connectionsWithoutRequest.Inc()
	}
}

// markServed records that a request reached the proxy on its connection,
// and says whether that connection is over the connection limits.
func markServed(r *http.Request) (overLimit bool) {
	if rec, ok := r.Context().Value(connRecordKey{}).(*connRecord); ok {
		rec.served.Store(true)
		return rec.overLimit
	}
	return false
}
