// Package proxy serves the IMDS API to workloads and forwards what it does not
// answer itself to one configured upstream IMDS.
//
// It answers IMDSv2 token requests with its own tokens (package token), so the
// token response travels over loopback or one local hop and the instance's hop
// limit no longer matters; it keeps its own IMDSv2 session with the upstream;
// and it applies the IMDSv1 policy to requests that carry no token.
//
// The engine is goproxy, used as a transparent proxy: only requests with a
// relative URI are served, and every one of them goes to the configured
// upstream whatever its Host header says. Absolute-URI requests and CONNECT are
// refused before goproxy sees them, so nothing else is ever contacted.
package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/elazarl/goproxy"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/time/rate"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/token"
	"github.com/imds-proxy/imds-proxy/workload"
)

// maxUpstreamTokenBytes bounds the upstream's token, with room to spare.
const maxUpstreamTokenBytes = 4096

// Config is the proxy's whole configuration. DefaultConfig is the serving
// commands' one; the zero values of the fields documented "If zero" are
// valid too.
type Config struct {
	// Upstream is the IMDS (or node agent) that every forwarded request goes
	// to, e.g. http://169.254.169.254: http, with no path. Required.
	Upstream *url.URL
	// V1 is the policy for requests without a token, for callers whose
	// workload sets none. Required.
	V1 imdsapi.V1Policy
	// V1Floor is the loosest IMDSv1 policy a workload's own setting
	// (workload.V1Key) can choose: a workload can only tighten it. If
	// empty, V1 is the floor.
	V1Floor imdsapi.V1Policy
	// V1Tokenless forwards the tokenless requests the policy lets through
	// as they came, without the proxy's session token, and past the cache
	// and coalescing: the instance then counts each of them as IMDSv1 (its
	// MetadataNoToken metric). If false, they are upgraded to IMDSv2.
	V1Tokenless bool
	// Workloads names the workload behind each caller, for the outputs
	// and, in a node agent, for the workload's own policy. If nil,
	// callers are known by address and process only.
	Workloads *workload.Resolver
	// GuardOwnIdentity refuses the node role's credentials (404, as IMDS
	// answers where no role is attached) to workloads that have an AWS
	// identity of their own (workload.Workload.OwnIdentity).
	GuardOwnIdentity bool
	// WorkloadRole, if set, is the workload's own role, which the role
	// path (iam/security-credentials/ and iam/info, in every API version)
	// answers in place of the instance's; the role path is then never
	// forwarded, and while the role's source fails it answers 404, as IMDS
	// does where no role is attached (--credentials=workload, a sidecar's).
	WorkloadRole RoleSource
	// Paths decides which metadata paths may be forwarded. If zero, all.
	Paths PathPolicy
	// Mode is announced in the X-Imds-Proxy header of every answer, so that
	// `imds-proxy doctor` can tell who answered. If empty, "imds-proxy".
	Mode imdsapi.Mode

	// V1CallersMax bounds the /v1-callers table; one caller (see v1Callers)
	// holds at most a sixteenth of it. If zero, 1024 entries.
	V1CallersMax int
	// V1LogInterval is the window of the per-caller log limit: each caller's
	// first few tokenless (or path-denied) requests in a window are logged
	// one by one, and the rest in one summary line when it ends. If zero,
	// one minute.
	V1LogInterval time.Duration
	// V1ProbeInterval is how often, between session refreshes, the proxy
	// asks the upstream whether it serves tokenless requests. Each probe is
	// a tokenless request, which an instance that still allows IMDSv1 may
	// count in its MetadataNoToken metric. Only auto, allow and warn ask.
	// If zero, only at start and at each session refresh.
	V1ProbeInterval time.Duration
	// V1AttributionsPerSecond bounds how often a tokenless request is
	// attributed to a process (a scan of /proc), so that a flood of IMDSv1
	// requests cannot spend the proxy's CPU on it. Requests past the bound
	// are logged and counted without the process. If zero, 20 a second, in
	// bursts of as many.
	V1AttributionsPerSecond float64

	// UpstreamV1Fallback serves tokenless requests upstream while no upstream
	// token can be had; when false, clients get 503 instead.
	UpstreamV1Fallback bool
	// UpstreamTokenTTL is the lifetime requested for the upstream token,
	// which is refreshed at half of it. Required, within token.MinTTL..MaxTTL.
	UpstreamTokenTTL time.Duration
	// UpstreamTokenTimeout bounds one upstream token request. Required.
	UpstreamTokenTimeout time.Duration
	// UpstreamRetryMin and UpstreamRetryMax bound the backoff between token
	// attempts while the upstream session is not IMDSv2. Required.
	UpstreamRetryMin, UpstreamRetryMax time.Duration
	// UpstreamDialTimeout bounds connecting to the upstream. Required.
	UpstreamDialTimeout time.Duration
	// UpstreamResponseTimeout bounds the wait for upstream response headers.
	// Required.
	UpstreamResponseTimeout time.Duration
	// UpstreamDialControl, if set, is applied to every upstream socket before
	// it connects (the iptables exemption marks sockets with it).
	UpstreamDialControl func(network, address string, c syscall.RawConn) error

	// Cache keeps upstream answers for a short while. If zero, nothing is
	// cached.
	Cache CacheConfig
	// Retry bounds retries of throttled and failed upstream requests. If
	// zero, one attempt and no retries.
	Retry RetryConfig
	// DisableCoalescing sends every client request upstream on its own,
	// even when an identical one is in flight (benchmarks use it).
	DisableCoalescing bool
	// Limits bound clients' connections and requests. If zero, no limit of
	// the proxy's own beyond net/http's, except that request bodies, which
	// IMDS requests never have, are refused past 4 KiB.
	Limits ServerLimits
}

// RoleSource is the workload's own role (Config.WorkloadRole);
// workloadrole.Role, in the imds-proxy-workload-role build, is the one.
type RoleSource interface {
	// Role names it: its name, the one entry the listing gives; its ARN,
	// which iam/info gives, or "" where unknown; and its source, for logs,
	// metrics and imds-proxy doctor.
	Role() (name, arn, source string)
	// Credentials are its credentials: the ones it holds, or with renew,
	// or when it holds none, new ones from its source; or why it has none.
	Credentials(ctx context.Context, renew bool) (imdsapi.RoleCredentials, error)
}

// The defaults of the fields documented "If zero".
const (
	defaultV1CallersMax            = 1024
	defaultV1LogInterval           = time.Minute
	defaultV1AttributionsPerSecond = 20
)

// DefaultConfig is the configuration of the serving commands, whose flags
// start from it; only Upstream is left for the caller to set.
func DefaultConfig() Config {
	return Config{
		V1:                      imdsapi.V1Auto,
		V1CallersMax:            defaultV1CallersMax,
		V1LogInterval:           defaultV1LogInterval,
		V1AttributionsPerSecond: defaultV1AttributionsPerSecond,
		UpstreamV1Fallback:      true,
		UpstreamTokenTTL:        token.MaxTTL,
		UpstreamTokenTimeout:    time.Second,
		UpstreamRetryMin:        time.Second,
		UpstreamRetryMax:        time.Minute,
		UpstreamDialTimeout:     time.Second,
		UpstreamResponseTimeout: 5 * time.Second,
		Cache:                   DefaultCacheConfig(),
		Retry:                   DefaultRetryConfig(),
		Limits:                  DefaultServerLimits(),
	}
}

// withZeroDefaults is c with the fields documented "If zero" filled in.
func (c Config) withZeroDefaults() Config {
	if c.V1CallersMax <= 0 {
		c.V1CallersMax = defaultV1CallersMax
	}
	if c.V1LogInterval <= 0 {
		c.V1LogInterval = defaultV1LogInterval
	}
	if c.V1AttributionsPerSecond <= 0 {
		c.V1AttributionsPerSecond = defaultV1AttributionsPerSecond
	}
	if c.V1Floor == "" {
		c.V1Floor = c.V1
	}
	c.Retry.Attempts = max(c.Retry.Attempts, 1)
	c.Retry.MaxDelay = max(c.Retry.MaxDelay, c.Retry.BaseDelay)
	return c
}

// Validate checks the configuration and says what to fix.
func (c *Config) Validate() error {
	switch {
	case c.Upstream == nil:
		return errors.New("no upstream configured")
	case c.Upstream.Scheme != "http":
		return fmt.Errorf("upstream %q: scheme must be http (IMDS speaks plain HTTP)", c.Upstream.Redacted())
	case c.Upstream.Host == "":
		return fmt.Errorf("upstream %q has no host", c.Upstream.Redacted())
	case c.Upstream.Path != "" && c.Upstream.Path != "/", c.Upstream.RawQuery != "", c.Upstream.User != nil:
		return fmt.Errorf("upstream %q must be scheme://host[:port] only, with no path, query or credentials", c.Upstream.Redacted())
	}
	if _, err := imdsapi.ParseV1Policy(string(c.V1)); err != nil {
		return err
	}
	if c.V1Floor != "" {
		if _, err := imdsapi.ParseV1Policy(string(c.V1Floor)); err != nil {
			return fmt.Errorf("IMDSv1 floor: %w", err)
		}
		if imdsapi.AtLeast(c.V1, c.V1Floor) != c.V1 {
			return fmt.Errorf("the IMDSv1 policy %s is looser than the floor %s that workloads are held to", c.V1, c.V1Floor)
		}
	}
	if err := c.Cache.validate(); err != nil {
		return err
	}
	if l := c.Limits; l.MaxConnections < 0 || l.MaxConnectionsPerClient < 0 || l.MaxHeaderBytes < 0 || l.MaxBodyBytes < 0 || l.MaxHeaderBytes > 0 && l.MaxHeaderBytes < 1024 {
		return fmt.Errorf("limits: connections and bytes must not be negative, and headers need at least 1024 bytes")
	}
	if c.Retry.Attempts < 0 || c.Retry.Attempts > 10 || c.Retry.Attempts > 1 && c.Retry.BaseDelay <= 0 {
		return fmt.Errorf("upstream attempts must be 0..10 with a positive retry delay, got %d and %s", c.Retry.Attempts, c.Retry.BaseDelay)
	}
	if c.UpstreamTokenTTL < token.MinTTL || c.UpstreamTokenTTL > token.MaxTTL {
		return fmt.Errorf("upstream token TTL %s is outside %s..%s", c.UpstreamTokenTTL, token.MinTTL, token.MaxTTL)
	}
	for name, d := range map[string]time.Duration{
		"upstream token timeout": c.UpstreamTokenTimeout, "upstream retry minimum": c.UpstreamRetryMin,
		"upstream retry maximum": c.UpstreamRetryMax, "upstream dial timeout": c.UpstreamDialTimeout,
		"upstream response timeout": c.UpstreamResponseTimeout,
	} {
		if d <= 0 {
			return fmt.Errorf("%s must be positive, got %s", name, d)
		}
	}
	return nil
}

// Proxy is the IMDS proxy. It is an http.Handler; call Run to keep its
// upstream session alive.
type Proxy struct {
	id      string // this process's imdsapi.LoopHeader value
	cfg     Config
	log     *zap.Logger
	metrics *metrics
	minter  *token.Minter
	session *session
	engine  *goproxy.ProxyHttpServer
	fwd     *forwarder
	callers *v1Callers
	// logs bounds the log lines one caller's requests can cause.
	logs       *logLimiter
	attributor attribution.Attributor
	// attributions bounds the attributor's rate.
	attributions *rate.Limiter
	// upstreamIdle closes idle upstream connections when Run ends.
	upstreamIdle func()
	// role serves cfg.WorkloadRole, if set.
	role *workloadRole
}

// New builds a Proxy. The caller owns reg (metrics are registered there) and
// minter (whose key signs client tokens).
func New(cfg Config, log *zap.Logger, reg prometheus.Registerer, minter *token.Minter) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid proxy configuration: %w", err)
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("registering metrics: %w", err)
	}
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("reading random proxy id: %w", err)
	}
	cfg = cfg.withZeroDefaults()
	transport := newUpstreamTransport(&cfg)
	p := &Proxy{id: hex.EncodeToString(id), cfg: cfg, log: log, metrics: m, minter: minter, upstreamIdle: transport.CloseIdleConnections}
	p.session = newSession(&p.cfg, p.id, transport, log, m)
	p.session.v1Changed = p.v1StateChanged
	m.setV1Policy(cfg.V1, effectiveV1(cfg.V1, upstreamV1Unknown))
	p.fwd = &forwarder{id: p.id, upstream: p.cfg.Upstream, transport: transport, session: p.session, metrics: m,
		bodyTimeout: cfg.UpstreamResponseTimeout, coalesce: !cfg.DisableCoalescing, cache: newCache(cfg.Cache, m.setCacheSize), retry: cfg.Retry}
	p.engine = p.newEngine()
	p.callers = newV1Callers(cfg.V1CallersMax, func(reason string) { m.v1CallersEvicted.WithLabelValues(reason).Inc() })
	p.logs = newLogLimiter(cfg.V1LogInterval)
	p.attributions = rate.NewLimiter(rate.Limit(cfg.V1AttributionsPerSecond), int(math.Ceil(cfg.V1AttributionsPerSecond)))
	if cfg.WorkloadRole != nil {
		if p.role, err = newWorkloadRole(cfg.WorkloadRole, log, reg); err != nil {
			return nil, fmt.Errorf("registering metrics: %w", err)
		}
	}
	return p, nil
}

// V1Callers serves the table of distinct IMDSv1 callers as JSON: who still
// calls without a token, how often, since when, and for which paths. It
// belongs on the admin listener.
func (p *Proxy) V1Callers() http.Handler { return p.callers }

// Run keeps the upstream IMDSv2 session, writes the log limit's summaries,
// and keeps the workload role's credentials fresh, until ctx is cancelled.
func (p *Proxy) Run(ctx context.Context) {
	defer p.upstreamIdle()
	var background sync.WaitGroup
	background.Go(func() { p.logs.run(ctx, p.log) })
	if p.role != nil {
		background.Go(func() { p.role.keepFresh(ctx) })
	}
	p.session.run(ctx)
	background.Wait()
}

// Ready reports an error until the upstream session state is decided
// (IMDSv2, IMDSv1 fallback or down), so that readiness probes wait for it.
func (p *Proxy) Ready() error { return p.session.ready() }

// upstreamConns bounds the proxy's connections to the upstream; requests
// beyond it wait for one (the coalescing and the cache keep them few).
const upstreamConns = 64

// newUpstreamTransport returns the proxy's own HTTP transport: it ignores
// HTTP_PROXY and friends, bounds every wait, keeps a small pool, and passes
// bodies through untouched (no transparent gzip).
func newUpstreamTransport(cfg *Config) *http.Transport {
	dialer := &net.Dialer{Timeout: cfg.UpstreamDialTimeout, Control: cfg.UpstreamDialControl}
	return &http.Transport{
		Proxy:       nil,
		DialContext: dialer.DialContext,
		// As many idle connections as the proxy may open: a pool smaller than
		// the cap closes and re-dials connections whenever more than it are
		// busy, and every dial costs IMDS's packet budget three packets more.
		MaxIdleConns:           upstreamConns,
		MaxIdleConnsPerHost:    upstreamConns,
		MaxConnsPerHost:        upstreamConns,
		IdleConnTimeout:        60 * time.Second,
		ResponseHeaderTimeout:  cfg.UpstreamResponseTimeout,
		DisableCompression:     true,
		MaxResponseHeaderBytes: 64 << 10,
	}
}

// zapPrintf routes goproxy's own log lines to zap: its warnings at warn, the
// rest at debug.
type zapPrintf struct{ log *zap.Logger }

func (z zapPrintf) Printf(format string, v ...any) {
	// goproxy's messages may quote a request; bound them like any client string.
	msg := truncateN(fmt.Sprintf(format, v...), 4*maxFieldLen)
	if strings.Contains(msg, "] WARN: ") {
		z.log.Warn("goproxy", zap.String("message", msg))
		return
	}
	z.log.Debug("goproxy", zap.String("message", msg))
}
