package proxy

import (
	"container/list"
	"context"
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
	// MaxConnections bounds the connections held at once (0: no limit).
	// MaxConnectionsPerClient bounds those of one client address, so that
	// one container cannot hold a node agent's every connection (0: no
	// limit, right for a sidecar, whose every client is 127.0.0.1). A new
	// connection past either limit first reclaims an idle keep-alive
	// connection (see connTable); only when none is idle does it get 503
	// and is closed.
	MaxConnections, MaxConnectionsPerClient int
}

// DefaultServerLimits are the serving commands' limits.
func DefaultServerLimits() ServerLimits {
	return ServerLimits{ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, IdleTimeout: 90 * time.Second, WriteTimeout: 30 * time.Second,
		MaxHeaderBytes: 16 << 10, MaxBodyBytes: 4 << 10, MaxConnections: 4096}
}

// DefaultNodeServerLimits are a node agent's limits: DefaultServerLimits
// with at most 256 connections per client address (one pod).
// An SDK holds one or two connections, so 256 is room for a pod's every
// process and thread.
// It takes 16 addresses at that cap to hold all 4,096 connections, so one
// greedy pod holds at most a sixteenth of them.
// Even when the 4,096 are all held, a new client is served: the longest-idle
// keep-alive connection of the address holding the most is closed for it.
// A pod past its own cap reclaims its own longest-idle connection, so it
// cannot grow at the others' expense.
func DefaultNodeServerLimits() ServerLimits {
	l := DefaultServerLimits()
	l.MaxConnectionsPerClient = 256
	return l
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
	// Shared: the limit is the proxy's, not each listener's.
	conns := newConnTable(limits.MaxConnections, limits.MaxConnectionsPerClient, p.metrics.connectionsOpen.Set, p.metrics.connectionsIdle.Set)
	srv.ConnContext = watch.context
	srv.ConnState = func(c net.Conn, state http.ConnState) {
		conns.observe(c, state)
		watch.observe(c, state)
	}
	refusing := new(atomic.Int64)
	limit = func(ln net.Listener) net.Listener {
		return &limitListener{Listener: ln, conns: conns, refusing: refusing, m: p.metrics}
	}
	return srv, limit
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
	conns    *connTable
	refusing *atomic.Int64
	m        *metrics
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
		admitted, reclaimed, refused := l.conns.admit(c)
		if reclaimed != nil {
			// Closed outside the table's lock: Close takes it. The table has
			// released the connection's slot already, so this Close, and
			// net/http's own when its Peek fails, only close the socket.
			_ = reclaimed.Close()
			l.m.connectionsReclaimed.Inc()
		}
		if admitted != nil {
			return admitted, nil
		}
		l.m.connectionsRejected.WithLabelValues(refused).Inc()
		if l.refusing.Add(1) <= maxRefusing {
			return &refusedConn{Conn: c, release: func() { l.refusing.Add(-1) }}, nil
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

// The values of imds_proxy_connections_rejected_total's "limit" label: the
// limit that refused a connection.
const (
	limitTotal     = "total"
	limitPerClient = "per_client"
)

// connTable counts open connections in all and per client address, and
// keeps each address's idle keep-alive connections, longest idle first, so
// that a new connection past a limit can take the place of one of them.
// Longest idle means least recently used: whose last request came first.
//
// Only a connection in http.StateIdle is reclaimable.
// net/http enters that state only after a response has been written out
// whole, so such a connection has served a request and none is in flight.
// A connection that never sent a request is never in it: the read-header
// timeout bounds those.
// net/http leaves that state (http.StateActive) once it has read the next
// request's headers, before the handler runs.
// The state hook (observe) and admit both hold mu.
// So a connection whose request is in the handler is on no idle list when
// admit looks, and is never reclaimed.
// A reclaimed connection loses only a next request whose headers were still
// arriving; any keep-alive server's idle timeout has the same race, and
// HTTP clients retry a request that a reused connection closes unanswered.
// A connection is reclaimed at most once: admit takes it off its list and
// releases its slot under mu.
// Each connection's hooks run on its own goroutine, so two connections'
// StateIdle hooks can run in either order.
// Their StateActive hooks cannot: a client sees the response to one request
// only after its StateActive hook has run.
// So the lists are ordered by the StateActive hook (lastUse), not by the
// StateIdle one.
type connTable struct {
	max, maxPerClient int
	open, idle        func(float64) // told the totals after every change
	mu                sync.Mutex
	total, idleTotal  int
	clients           map[netip.Addr]*clientConns
	uses              uint64 // requests read in all: the clock of lastUse
}

// clientConns are one client address's connections.
type clientConns struct {
	open int
	idle list.List // of *countedConn, least recently used first
}

func newConnTable(max, maxPerClient int, open, idle func(float64)) *connTable {
	return &connTable{max: max, maxPerClient: maxPerClient, open: open, idle: idle, clients: map[netip.Addr]*clientConns{}}
}

// admit counts c, unless a limit is reached and no idle connection can make
// room: then it returns the limit that refused c. To make room it releases
// an idle connection's slot and returns that connection, for the caller to
// close. Past the client's own limit, that is the client's longest-idle
// connection; past the total, the longest-idle of the client holding the
// most connections that has an idle one.
func (t *connTable) admit(c net.Conn) (admitted, reclaimed *countedConn, refused string) {
	client := clientAddr(c)
	t.mu.Lock()
	defer t.mu.Unlock()
	cl := t.clients[client]
	switch {
	case t.maxPerClient > 0 && cl != nil && cl.open >= t.maxPerClient:
		// Its own connection: a client over its cap does not take from others.
		if reclaimed = cl.longestIdle(); reclaimed == nil {
			return nil, nil, limitPerClient
		}
	case t.max > 0 && t.total >= t.max:
		if reclaimed = t.busiestIdle(); reclaimed == nil {
			return nil, nil, limitTotal
		}
	}
	if reclaimed != nil {
		// Released now, under mu, so that the slot is this connection's:
		// another Accept cannot take it between the release and the count.
		t.releaseLocked(reclaimed)
	}
	if cl = t.clients[client]; cl == nil { // releaseLocked may have removed it
		cl = &clientConns{}
		t.clients[client] = cl
	}
	admitted = &countedConn{Conn: c, table: t, client: client, counted: true}
	cl.open++
	t.total++
	t.open(float64(t.total))
	return admitted, reclaimed, ""
}

func (cl *clientConns) longestIdle() *countedConn {
	if e := cl.idle.Front(); e != nil {
		return e.Value.(*countedConn)
	}
	return nil
}

// busiestIdle is the longest-idle connection of the client holding the
// most connections among those with an idle one (of equals, the one whose
// longest-idle connection was used least recently). It looks at every
// client: it runs only when every slot is taken.
func (t *connTable) busiestIdle() *countedConn {
	var best *countedConn
	bestOpen := 0
	for _, cl := range t.clients {
		c := cl.longestIdle()
		if c == nil {
			continue
		}
		if best == nil || cl.open > bestOpen || cl.open == bestOpen && c.lastUse < best.lastUse {
			best, bestOpen = c, cl.open
		}
	}
	return best
}

// observe is part of the server's ConnState hook: it keeps the idle lists.
func (t *connTable) observe(c net.Conn, state http.ConnState) {
	cc, ok := c.(*countedConn)
	if !ok {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch state {
	case http.StateActive:
		t.notIdleLocked(cc)
		t.uses++
		cc.lastUse = t.uses
	case http.StateIdle:
		// A released connection is closed or being closed: not a candidate.
		if cc.counted && cc.idle == nil {
			t.idleLocked(cc)
		}
	default:
		t.notIdleLocked(cc)
	}
}

// idleLocked puts c on its client's idle list by lastUse. It is almost
// always last: the walk only passes connections whose StateIdle hook ran
// before c's though their request came after c's.
func (t *connTable) idleLocked(c *countedConn) {
	queue := &t.clients[c.client].idle
	e := queue.Back()
	for e != nil && e.Value.(*countedConn).lastUse > c.lastUse {
		e = e.Prev()
	}
	if e == nil {
		c.idle = queue.PushFront(c)
	} else {
		c.idle = queue.InsertAfter(c, e)
	}
	t.idleTotal++
	t.idle(float64(t.idleTotal))
}

func (t *connTable) notIdleLocked(c *countedConn) {
	if c.idle != nil {
		t.clients[c.client].idle.Remove(c.idle)
		c.idle = nil
		t.idleTotal--
		t.idle(float64(t.idleTotal))
	}
}

// releaseLocked gives up c's slot, once: Close and a reclaim both call it.
func (t *connTable) releaseLocked(c *countedConn) {
	if !c.counted {
		return
	}
	c.counted = false
	t.notIdleLocked(c)
	t.total--
	cl := t.clients[c.client]
	if cl.open--; cl.open <= 0 {
		delete(t.clients, c.client)
	}
	t.open(float64(t.total))
}

// countedConn is a connection within the limits.
type countedConn struct {
	net.Conn
	table  *connTable
	client netip.Addr
	// Guarded by table.mu.
	counted bool          // holds a slot: not yet closed or reclaimed
	idle    *list.Element // its place in its client's idle list, or nil
	lastUse uint64        // connTable.uses when its latest request was read
}

func (c *countedConn) Close() error {
	c.table.mu.Lock()
	c.table.releaseLocked(c)
	c.table.mu.Unlock()
	return c.Conn.Close()
}

// refusedConn is a connection past the limits: its request gets 503.
type refusedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *refusedConn) Close() error {
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
	_, overLimit := c.(*refusedConn)
	rec := &connRecord{overLimit: overLimit}
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

// markServed records that a request reached the proxy on its connection.
func markServed(r *http.Request) {
	if rec, ok := r.Context().Value(connRecordKey{}).(*connRecord); ok {
		rec.served.Store(true)
	}
}

// overConnectionLimit says whether r came on a connection past the
// connection limits, which is answered 503 and closed.
func overConnectionLimit(r *http.Request) bool {
	rec, ok := r.Context().Value(connRecordKey{}).(*connRecord)
	return ok && rec.overLimit
}
