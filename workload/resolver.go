package workload

import (
	"context"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/imds-proxy/imds-proxy/internal/attribution"
)

// Caller is what a node agent knows about the origin of one connection.
type Caller struct {
	// Namespace is the network namespace the connection came from, for
	// finding its process (attribution.Attributor.LookupIn).
	Namespace attribution.Namespace
	// Container is the container that namespace belongs to.
	Container attribution.Container
	// Workload is the container's workload, where a source knows it.
	Workload Workload
	// Traced says the namespace was found; false for a caller beyond this
	// host, one whose trace was skipped over the scan bound, or any caller
	// of a sidecar's resolver.
	Traced bool
}

// Resolver names the workload behind a container, and for a node agent
// the workload behind each connection: the caller's address gives its
// network namespace and container (attribution.Callers), and the sources
// give the container's workload.
type Resolver struct {
	sources []Source
	// callers traces connections to namespaces; nil in a sidecar, which
	// shares its callers' namespace and finds their processes directly.
	callers *attribution.Callers
	// scans bounds the /proc scans for addresses not yet known, so that
	// a flood of new connections cannot spend the agent's CPU on them.
	scans *rate.Limiter

	mu sync.Mutex
	// pending are the addresses traced in the background now, each with a
	// channel closed when its trace ends.
	pending map[netip.Addr]chan struct{}
}

// NewResolver names the workloads of containers from sources, asked in
// order. Its Of traces nothing, and knows callers by address only: it is a
// sidecar's, or a node agent's that cannot see other processes.
func NewResolver(sources ...Source) *Resolver {
	return &Resolver{sources: sources}
}

// A node agent's defaults for NewNodeResolver.
const (
	// DefaultCallerTTL bounds how long a caller address's namespace is
	// trusted without a rescan; a namespace that loses the process it was
	// found through is rescanned before that.
	DefaultCallerTTL = time.Minute
	// DefaultScansPerSecond bounds the /proc scans for new addresses.
	DefaultScansPerSecond = 20
)

// NewNodeResolver is a node agent's resolver: Of traces each new caller
// address to its namespace in a's proc filesystem, remembers it for ttl,
// and scans for at most scansPerSecond new addresses a second.
func NewNodeResolver(a attribution.Attributor, ttl time.Duration, scansPerSecond float64, sources ...Source) *Resolver {
	return &Resolver{sources: sources, callers: attribution.NewCallers(a, ttl),
		scans:   rate.NewLimiter(rate.Limit(scansPerSecond), max(1, int(scansPerSecond))),
		pending: map[netip.Addr]chan struct{}{}}
}

// Of is what is known of client's connection without scanning /proc: its
// namespace and container where a node agent traced its address before,
// and its workload from the container or, failing that, from a source
// that knows the address (a pod's IP). It never waits on the network or
// on a scan; where the address is not traced yet, a trace starts in the
// background (within the scan bound), for the requests that follow.
func (r *Resolver) Of(client netip.AddrPort) Caller {
	if r == nil {
		return Caller{}
	}
	c := r.known(client)
	if !c.Traced && r.callers != nil {
		r.traceLater(client)
	}
	return c
}

// Trace is Of, but scans /proc now (within the scan bound) where the
// address is not traced yet: for a decision or a record that needs the
// caller's container or process.
func (r *Resolver) Trace(client netip.AddrPort) Caller {
	if r == nil {
		return Caller{}
	}
	c := r.known(client)
	if c.Traced || r.callers == nil {
		return c
	}
	r.mu.Lock()
	background := r.pending[client.Addr()]
	r.mu.Unlock()
	if background != nil {
		// Of started the same scan for this address: wait for it rather
		// than scan twice.
		<-background
		return r.known(client)
	}
	if !r.scans.Allow() {
		return c
	}
	if ns, container, ok := r.callers.Find(client); ok {
		return r.traced(ns, container, client)
	}
	return c
}

// known is what Of knows.
func (r *Resolver) known(client netip.AddrPort) Caller {
	if r.callers != nil {
		if ns, container, ok := r.callers.Known(client); ok {
			return r.traced(ns, container, client)
		}
	}
	return Caller{Workload: r.atAddress(client.Addr())}
}

func (r *Resolver) traced(ns attribution.Namespace, container attribution.Container, client netip.AddrPort) Caller {
	c := Caller{Namespace: ns, Container: container, Workload: r.Workload(container), Traced: true}
	if !c.Workload.Known() {
		c.Workload = r.atAddress(client.Addr())
	}
	return c
}

// maxPendingTraces bounds the background traces in flight.
const maxPendingTraces = 64

// traceLater traces client in the background, once per address at a time,
// while the connection is open (its socket is in the tables).
func (r *Resolver) traceLater(client netip.AddrPort) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, pending := r.pending[client.Addr()]; pending || len(r.pending) >= maxPendingTraces || !r.scans.Allow() {
		return
	}
	done := make(chan struct{})
	r.pending[client.Addr()] = done
	go func() {
		r.callers.Find(client)
		r.mu.Lock()
		delete(r.pending, client.Addr())
		r.mu.Unlock()
		close(done)
	}()
}

// AddressSource is a Source that also knows its workloads' addresses (a
// pod's IPs, a bridge-mode container's), for a caller that cannot be
// traced to its container.
type AddressSource interface {
	// LookupAddr returns the workload at addr if the source knows it. A
	// workload on the host's own network is never at an address here.
	LookupAddr(addr netip.Addr) (Workload, bool)
}

// atAddress is the workload at addr from the first source that knows it.
func (r *Resolver) atAddress(addr netip.Addr) Workload {
	for _, s := range r.sources {
		if as, ok := s.(AddressSource); ok {
			if w, ok := as.LookupAddr(addr); ok {
				return w
			}
		}
	}
	return Workload{}
}

// Workload is container's workload from the first source that knows it.
func (r *Resolver) Workload(container attribution.Container) Workload {
	if r == nil || container.ID == "" && container.PodUID == "" {
		return Workload{}
	}
	for _, s := range r.sources {
		if w, ok := s.Lookup(container); ok {
			return w
		}
	}
	return Workload{}
}

// Run runs every source until ctx ends.
func (r *Resolver) Run(ctx context.Context) {
	if r == nil {
		return
	}
	var wg sync.WaitGroup
	for _, s := range r.sources {
		wg.Go(func() { s.Run(ctx) })
	}
	wg.Wait()
}
