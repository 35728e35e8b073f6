package proxy

import (
	"net"
	"net/http"
	"net/netip"
	"testing"
)

// fakeConn is a connection from a given client address; nothing is read or
// written on it.
type fakeConn struct {
	net.Conn
	from netip.AddrPort
}

func (c fakeConn) RemoteAddr() net.Addr { return net.TCPAddrFromAddrPort(c.from) }
func (fakeConn) Close() error           { return nil }

// TestConnTableOrder drives the state hooks in orders net/http can produce
// but a test over the network cannot force: the longest idle is the least
// recently used even when its StateIdle hook ran last; a connection in
// StateActive or never used is never taken; a reclaimed connection's slot
// is released once, however often it is closed after.
func TestConnTableOrder(t *testing.T) {
	var open, idle float64
	tab := newConnTable(4, 3, func(n float64) { open = n }, func(n float64) { idle = n })
	from := func(ip string, port uint16) net.Conn {
		return fakeConn{from: netip.AddrPortFrom(netip.MustParseAddr(ip), port)}
	}
	admit := func(c net.Conn) *countedConn {
		t.Helper()
		cc, reclaimed, refused := tab.admit(c)
		if cc == nil || reclaimed != nil {
			t.Fatalf("admit: %v, reclaimed %v, refused %q", cc, reclaimed, refused)
		}
		return cc
	}
	a0, a1, a2 := admit(from("10.0.0.1", 1)), admit(from("10.0.0.1", 2)), admit(from("10.0.0.1", 3))
	b0 := admit(from("10.0.0.2", 1))
	for _, c := range []*countedConn{a0, a1, b0} {
		tab.observe(c, http.StateNew)
	}
	tab.observe(a0, http.StateActive) // a0's request first...
	tab.observe(a1, http.StateActive)
	tab.observe(a1, http.StateIdle)
	tab.observe(a0, http.StateIdle) // ...its StateIdle hook last
	tab.observe(b0, http.StateActive)
	tab.observe(b0, http.StateIdle)
	tab.observe(b0, http.StateActive) // in flight again; a2 never sent a request
	if open != 4 || idle != 2 {
		t.Fatalf("open %v idle %v, want 4 and 2", open, idle)
	}
	// Past the total, from a new client: the busiest client's least recently used.
	c0, reclaimed, _ := tab.admit(from("10.0.0.3", 1))
	if c0 == nil || reclaimed != a0 {
		t.Fatalf("past the total: reclaimed %p, want a0 %p (a1 %p)", reclaimed, a0, a1)
	}
	_ = a0.Close() // as Accept and then net/http do
	_ = a0.Close()
	if open != 4 || idle != 1 {
		t.Fatalf("after the reclaim: open %v idle %v, want 4 and 1", open, idle)
	}
	// Past the total again: a1 is the only idle one.
	if _, reclaimed, _ := tab.admit(from("10.0.0.2", 2)); reclaimed != a1 {
		t.Fatalf("reclaimed %p, want a1 %p", reclaimed, a1)
	}
	// Nothing idle now (a2 never used, b0 in flight): refused.
	if cc, reclaimed, refused := tab.admit(from("10.0.0.1", 4)); cc != nil || reclaimed != nil || refused != limitTotal {
		t.Fatalf("with nothing idle: %v, %v, %q; want refused by the total", cc, reclaimed, refused)
	}
	_ = a2.Close()
	_ = b0.Close()
	_ = c0.Close()
	if open != 1 || idle != 0 || len(tab.clients) != 1 {
		t.Fatalf("after closing: open %v idle %v clients %d, want 1, 0, 1", open, idle, len(tab.clients))
	}
}
