package attribution

import (
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"
)

// Callers remembers, for a node agent, which network namespace each caller
// address comes from, and the container that namespace belongs to. A pod
// or a bridge-mode container keeps its address and namespace for its
// whole life, so a connection from a known address costs one link read to
// check that the namespace's process still lives, and no scan.
type Callers struct {
	a Attributor
	// ttl bounds how long an answer is trusted without a rescan.
	ttl time.Duration
	now func() time.Time

	mu     sync.Mutex
	byAddr map[netip.Addr]callerNamespace
}

type callerNamespace struct {
	ns        Namespace
	container Container
	until     time.Time
}

// maxCallers bounds the addresses remembered; past it the table starts over.
const maxCallers = 8192

// NewCallers remembers callers for ttl at most.
func NewCallers(a Attributor, ttl time.Duration) *Callers {
	return &Callers{a: a, ttl: ttl, now: time.Now, byAddr: map[netip.Addr]callerNamespace{}}
}

// Known returns the namespace and container remembered for client's
// address, if the namespace still has the process it was found through.
func (c *Callers) Known(client netip.AddrPort) (Namespace, Container, bool) {
	c.mu.Lock()
	entry, ok := c.byAddr[client.Addr()]
	c.mu.Unlock()
	if !ok || !c.now().Before(entry.until) || !c.a.stillIn(entry.ns) {
		return Namespace{}, Container{}, false
	}
	return entry.ns, entry.container, true
}

// maxLivenessChecks bounds the processes stillIn asks about.
const maxLivenessChecks = 4

// stillIn says whether one of the first processes ns was found with
// still lives in it: the namespace, and the address in it, are then the
// same (a container's first process, its pause or init, outlives its
// commands).
func (a Attributor) stillIn(ns Namespace) bool {
	for _, pid := range ns.pids[:min(len(ns.pids), maxLivenessChecks)] {
		if a.inNamespace(pid, ns.ID) {
			return true
		}
	}
	return false
}

// Find scans for the namespace of client's connection, and remembers it
// for the address. found is false when no namespace here holds the socket:
// the connection closed, or it comes from beyond this host.
func (c *Callers) Find(client netip.AddrPort) (ns Namespace, container Container, found bool) {
	ns, found = c.a.FindNamespace(client)
	if !found {
		return Namespace{}, Container{}, false
	}
	container = c.a.namespaceContainer(ns)
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.byAddr) >= maxCallers {
		clear(c.byAddr)
	}
	c.byAddr[client.Addr()] = callerNamespace{ns: ns, container: container, until: c.now().Add(c.ttl)}
	return ns, container, true
}

// inNamespace says whether process pid lives, in network namespace id.
func (a Attributor) inNamespace(pid int, id uint64) bool {
	link, err := os.Readlink(filepath.Join(a.root(), strconv.Itoa(pid), "ns", "net"))
	return err == nil && link == "net:["+strconv.FormatUint(id, 10)+"]"
}

// namespaceContainer is the container of the first process in ns whose
// cgroup names one. The containers of a pod share its namespace and its
// pod UID; a bridge-mode container has a namespace of its own.
func (a Attributor) namespaceContainer(ns Namespace) Container {
	for _, pid := range ns.pids {
		if c := ParseCgroup(a.read(pid, "cgroup")); c.ID != "" {
			return c
		}
	}
	return Container{}
}
