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
		scans: rate.NewLimiter(rate.Limit(scansPerSecond), max(1, int(scansPerSecond)))}
}

// Of is what is known of client's connection: its namespace and container
// where a node agent can trace it, and its workload from the container or,
// failing that, from a source that knows the address (a pod's IP). It
// never waits on the network; a scan of /proc happens only for an address
// not known yet.
func (r *Resolver) Of(client netip.AddrPort) Caller {
	if r == nil {
		return Caller{}
	}
	var c Caller
	if r.callers != nil {
		ns, container, ok := r.callers.Known(client)
		if !ok && r.scans.Allow() {
			ns, container, ok = r.callers.Find(client)
		}
		if ok {
			c = Caller{Namespace: ns, Container: container, Workload: r.Workload(container), Traced: true}
		}
	}
	if !c.Workload.Known() {
		c.Workload = r.atAddress(client.Addr())
	}
	return c
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
