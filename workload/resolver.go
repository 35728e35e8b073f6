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
// order. Its Of traces nothing: it is a sidecar's.
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

// Of is what is known of client's connection. It never waits on the
// network; a scan of /proc happens only for an address not known yet.
func (r *Resolver) Of(client netip.AddrPort) Caller {
	if r == nil || r.callers == nil {
		return Caller{}
	}
	ns, container, ok := r.callers.Known(client)
	if !ok && r.scans.Allow() {
		ns, container, ok = r.callers.Find(client)
	}
	if !ok {
		return Caller{}
	}
	return Caller{Namespace: ns, Container: container, Workload: r.Workload(container), Traced: true}
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
