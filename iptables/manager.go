package iptables

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// DefaultExemptMark is the socket mark the sidecar puts on its own upstream
// connections so that they are not redirected back to itself.
const DefaultExemptMark = 0x1169

// MarkControl returns a net.Dialer Control function that sets SO_MARK on
// every socket. Setting a mark needs NET_ADMIN, or NET_RAW since Linux 5.17;
// an error here means the proxy has neither and should use --exempt-uid.
func MarkControl(mark uint32) func(network, address string, c syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		var sockErr error
		if err := c.Control(func(fd uintptr) {
			sockErr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		}); err != nil {
			return err
		}
		if sockErr != nil {
			return fmt.Errorf("setting socket mark 0x%x (needs NET_ADMIN; without it use --exempt-uid): %w", mark, sockErr)
		}
		return nil
	}
}

// Manager keeps one ruleset per family installed: it installs, re-checks
// periodically and restores what someone else deleted or shadowed, and
// removes on request.
type Manager struct {
	cfg      Config
	mu       sync.Mutex // one change to the rules at a time
	tables   []*Table
	rulesets []Ruleset
	log      *zap.Logger
	ready    atomic.Bool
	// unmatched (node) are the --interfaces patterns that matched no
	// interface when last checked, so that each change is logged once.
	unmatched []string
	// undelivered (node) is why redirected traffic would not reach the
	// listener at the last check, "" when it would.
	undelivered string
	// bypass is why IPv6 IMDS traffic would bypass the proxy at the last
	// check, "" when it would not.
	bypass string
	// repairs counts what reconcile found keeping the rules from capturing.
	repairs *prometheus.CounterVec

	// status guards what Ready reads while reconcile changes it.
	status sync.Mutex
	// broken is, per family, why the rules in place do not capture IMDS
	// traffic as installed, from finding it until a reinstall succeeds.
	broken map[Family]error
	// ipv6Gap is why the IPv6 redirect is not installed though asked for.
	ipv6Gap error
}

// Option configures a Manager.
type Option func(*options)

type options struct{ reg prometheus.Registerer }

// WithMetrics registers the manager's metrics with reg:
// imds_proxy_redirect_repairs_total{family,chain,kind}. Without it they are
// counted but not exported.
func WithMetrics(reg prometheus.Registerer) Option {
	return func(o *options) { o.reg = reg }
}

// NewManager opens the iptables binaries for the given families. Where
// ip6tables does not work, IPv6 is left out, and the manager is not ready
// while this namespace routes IPv6 to IMDS (IPv6Bypass).
func NewManager(cfg Config, backend Backend, families []Family, log *zap.Logger, opts ...Option) (*Manager, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid iptables configuration: %w", err)
	}
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	m := &Manager{cfg: cfg, log: log, broken: map[Family]error{}, repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imds_proxy_redirect_repairs_total",
		Help: "Differences reconcile found that kept the redirect from capturing IMDS traffic, and repaired: " +
			"kind is missing (a rule deleted), foreign (another program's rule in the proxy's chain or above its jump) or order.",
	}, []string{"family", "chain", "kind"})}
	if o.reg != nil {
		if err := o.reg.Register(m.repairs); err != nil {
			return nil, fmt.Errorf("registering the iptables metrics: %w", err)
		}
	}
	for _, family := range families {
		table, err := Open(family, backend)
		if err == nil && family == IPv6 {
			_, err = table.ipt.ListChains("nat")
		}
		if err != nil {
			if family == IPv6 {
				m.leaveOutIPv6(fmt.Errorf("ip6tables does not work here (make it work: on the host modprobe ip6table_nat, "+
					"or try the other --iptables-backend; or pass --ipv6=false to leave IPv6 IMDS unproxied): %w", err))
				continue
			}
			return nil, err
		}
		table.mode = cfg.Mode
		m.tables = append(m.tables, table)
		m.rulesets = append(m.rulesets, Build(cfg, family))
	}
	return m, nil
}

// leaveOutIPv6 records why the IPv6 redirect is not installed, and logs
// whether that lets IPv6 IMDS traffic bypass the proxy.
func (m *Manager) leaveOutIPv6(reason error) {
	m.status.Lock()
	m.ipv6Gap = reason
	m.status.Unlock()
	if !imdsv6Routed() {
		m.log.Info("no IPv6 redirect, and none needed: this namespace has no IPv6 route to IMDS", zap.Error(reason))
	}
	m.checkIPv6()
}

// IPv6Bypass reports why IPv6 IMDS traffic from this namespace would reach
// IMDS past the proxy: IPv6 was asked for, its redirect is not installed,
// and [fd00:ec2::254] is routed here. A namespace without IPv6, or without
// a route to it, has nothing to bypass.
func (m *Manager) IPv6Bypass() error {
	m.status.Lock()
	gap := m.ipv6Gap
	m.status.Unlock()
	if gap == nil || !imdsv6Routed() {
		return nil
	}
	return fmt.Errorf("IPv6 IMDS traffic to [fd00:ec2::254] would bypass the proxy: %w", gap)
}

// IPv6Uncovered reports, for imds-proxy doctor, why IPv6 IMDS traffic from
// this namespace gets past the redirect: [fd00:ec2::254] is routed here and
// no imds-proxy IPv6 chain exists (or ip6tables cannot tell).
func IPv6Uncovered() error {
	if !imdsv6Routed() {
		return nil
	}
	present, err := Present(IPv6)
	if err != nil {
		return fmt.Errorf("[fd00:ec2::254] is routed here, and ip6tables cannot tell whether it is redirected: %w", err)
	}
	if !present {
		return errors.New("[fd00:ec2::254] is routed here and not redirected: IPv6 IMDS traffic bypasses the proxy")
	}
	return nil
}

// imdsv6Routed reports whether this namespace has a route to IPv6 IMDS.
// Connecting a UDP socket sends nothing.
func imdsv6Routed() bool {
	c, err := net.Dial("udp6", net.JoinHostPort(strings.TrimSuffix(IMDSv6, "/128"), "80"))
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// checkIPv6 logs, each time the answer changes, whether IPv6 IMDS traffic
// would bypass the proxy (what /readyz also reports).
func (m *Manager) checkIPv6() {
	m.logChange(&m.bypass, m.IPv6Bypass(),
		"IPv6 IMDS traffic would bypass the proxy; a serving proxy is not ready while it would",
		"IPv6 IMDS traffic no longer bypasses the proxy: this namespace has no IPv6 route to IMDS any more")
}

// logChange logs err when it differs from the last one, *last: at error
// level while there is one, and recovered once it is gone.
func (m *Manager) logChange(last *string, err error, failing, recovered string, fields ...zap.Field) {
	reason := ""
	if err != nil {
		reason = err.Error()
	}
	switch {
	case reason == *last:
	case reason != "":
		m.log.Error(failing, append(fields, zap.String("reason", reason))...)
	default:
		m.log.Info(recovered, fields...)
	}
	*last = reason
}

// Manages reports whether the manager installs rules for family.
func (m *Manager) Manages(family Family) bool {
	for _, t := range m.tables {
		if t.family == family {
			return true
		}
	}
	return false
}

// DropIPv6 stops managing IPv6, for reason (the listener the IPv6 redirect
// delivers to cannot be bound); call it before Install. While this
// namespace routes IPv6 to IMDS, the manager is then not ready.
func (m *Manager) DropIPv6(reason error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, t := range m.tables {
		if t.family == IPv6 {
			m.tables = append(m.tables[:i], m.tables[i+1:]...)
			m.rulesets = append(m.rulesets[:i], m.rulesets[i+1:]...)
			m.leaveOutIPv6(reason)
			return
		}
	}
}

// Install installs every family's ruleset; on failure nothing is left.
func (m *Manager) Install() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, table := range m.tables {
		if err := table.Install(m.rulesets[i]); err != nil {
			_ = m.remove()
			return fmt.Errorf("installing %s rules (%s backend): %w", table.family, table.backend, err)
		}
		m.log.Info("iptables rules installed", zap.String("family", string(table.family)),
			zap.String("backend", string(table.backend)), zap.Int("rules", len(m.rulesets[i].Rules)+len(m.rulesets[i].Jumps)))
	}
	if n, err := FlushBypassingConnections(m.cfg.Mode); err != nil {
		m.log.Warn("could not reset IMDS connections opened before the rules; they bypass the proxy until they close", zap.Error(err))
	} else if n > 0 {
		m.log.Info("reset IMDS connections opened before the rules", zap.Int("connections", n))
	}
	m.status.Lock()
	clear(m.broken)
	m.status.Unlock()
	m.ready.Store(true)
	m.checkInterfaces()
	return nil
}

// checkDelivery logs, each time the answer changes, whether traffic the
// node rules send would reach the listener (what /readyz also reports).
func (m *Manager) checkDelivery() {
	if m.cfg.Mode != imdsapi.ModeNode {
		return
	}
	m.logChange(&m.undelivered, m.deliveryErr(), "redirected IMDS traffic would not reach the proxy; not ready",
		"redirected IMDS traffic reaches the proxy again", zap.String("node_address", m.cfg.NodeAddress.String()))
}

// Remove deletes every family's ruleset.
func (m *Manager) Remove() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.remove()
}

func (m *Manager) remove() error {
	m.ready.Store(false)
	var errs []error
	for i, table := range m.tables {
		errs = append(errs, table.Remove(m.rulesets[i]))
	}
	return errors.Join(errs...)
}

// RemoveOnExit removes the rules as the proxy exits, unless keep
// (--keep-rules-on-exit) leaves them to fail closed; the log says which.
func (m *Manager) RemoveOnExit(keep bool) {
	if keep {
		m.log.Info("leaving iptables rules in place (--keep-rules-on-exit)")
		return
	}
	if err := m.Remove(); err != nil {
		m.log.Error("removing iptables rules", zap.Error(err))
		return
	}
	m.log.Info("iptables rules removed")
}

// Ready reports why the rules keep the proxy from being ready. The rules
// must be installed. From the moment reconcile finds they no longer capture
// IMDS traffic, Ready fails until a reinstall succeeds. IPv6 IMDS traffic
// must not bypass the proxy (IPv6Bypass). In node mode, the traffic the
// rules send must reach the listener.
func (m *Manager) Ready() error {
	if !m.ready.Load() {
		return errors.New("iptables redirect rules not installed")
	}
	m.status.Lock()
	var broken []error
	for _, family := range []Family{IPv4, IPv6} {
		broken = append(broken, m.broken[family])
	}
	m.status.Unlock()
	if err := errors.Join(broken...); err != nil {
		return err
	}
	if err := m.IPv6Bypass(); err != nil {
		return err
	}
	return m.deliveryErr()
}

// deliveryErr (node) says why traffic the rules send would not reach the
// listener.
func (m *Manager) deliveryErr() error {
	if m.cfg.Mode != imdsapi.ModeNode {
		return nil
	}
	return CheckDelivery(netip.AddrPortFrom(m.cfg.NodeAddress, uint16(m.cfg.ProxyPort)))
}

// checkInterfaces logs, each time the answer changes, which --interfaces
// patterns match no interface of this node: a pattern that matches nothing
// (a CNI's other naming) leaves its containers without the proxy.
func (m *Manager) checkInterfaces() {
	if m.cfg.Mode != imdsapi.ModeNode {
		return
	}
	matches, err := MatchInterfaces(m.cfg.Interfaces)
	if err != nil {
		m.log.Warn("cannot check which interfaces --interfaces matches", zap.Error(err))
		return
	}
	var unmatched []string
	matched := 0
	for _, pattern := range m.cfg.Interfaces {
		if len(matches[pattern]) == 0 {
			unmatched = append(unmatched, pattern)
		}
		matched += len(matches[pattern])
	}
	if slices.Equal(unmatched, m.unmatched) && m.unmatched != nil {
		return
	}
	m.unmatched = append([]string{}, unmatched...)
	switch {
	case matched == 0:
		m.log.Warn("no interface matches --interfaces yet: no container on this node reaches the proxy until one does "+
			"(check the pattern for this node's CNI: imds-proxy doctor on the node lists the interfaces)",
			zap.Strings("interfaces", m.cfg.Interfaces))
	case len(unmatched) > 0:
		m.log.Info("some --interfaces patterns match no interface on this node", zap.Strings("unmatched", unmatched),
			zap.Int("matched_interfaces", matched))
	default:
		m.log.Info("every --interfaces pattern matches an interface", zap.Int("matched_interfaces", matched))
	}
}

// Reconcile re-checks the rules every interval until ctx ends, and restores
// any that are missing or no longer capture; in node mode it also logs when
// redirected traffic stops or starts reaching the listener, first at once.
func (m *Manager) Reconcile(ctx context.Context, interval time.Duration) {
	m.mu.Lock()
	m.checkDelivery()
	m.mu.Unlock()
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			m.reconcileOnce()
		}
	}
}

func (m *Manager) reconcileOnce() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.checkInterfaces()
	m.checkDelivery()
	m.checkIPv6()
	for i, table := range m.tables {
		m.restoreCapture(table, m.rulesets[i])
	}
}

// restoreCapture checks one family's rules, and reinstalls them when they
// no longer capture IMDS traffic as installed. A foreign rule found above a
// jump stays in its chain, below the jump. A foreign rule inside a proxy
// chain goes when the chain is rebuilt. The manager is not ready from the
// finding until a reinstall succeeds.
func (m *Manager) restoreCapture(table *Table, rs Ruleset) {
	family := zap.String("family", string(table.family))
	drifts, err := table.Check(rs)
	if err != nil {
		m.log.Error("checking iptables rules", family, zap.Error(err))
		return
	}
	if len(drifts) == 0 {
		return
	}
	for _, d := range drifts {
		m.log.Warn(driftMessage(d.Kind), family, zap.String("table", d.Table), zap.String("chain", d.Chain),
			zap.Int("position", d.Position), zap.String("rule", d.Rule), zap.String("kind", string(d.Kind)))
		m.repairs.WithLabelValues(string(table.family), d.Chain, string(d.Kind)).Inc()
	}
	broken := fmt.Errorf("the %s redirect does not capture IMDS traffic as installed: %s", table.family, describeDrifts(drifts))
	m.setBroken(table.family, broken)
	if err := table.reinstall(rs); err != nil {
		m.setBroken(table.family, fmt.Errorf("%w; restoring it failed: %w", broken, err))
		m.log.Error("restoring the iptables redirect failed; not ready until a reconcile restores it", family, zap.Error(err))
		return
	}
	m.setBroken(table.family, nil)
	m.log.Info("iptables redirect capture restored", family, zap.Int("differences", len(drifts)))
}

// driftMessage is the log message of a kind of drift.
func driftMessage(kind DriftKind) string {
	switch kind {
	case DriftMissing:
		return "iptables rule missing; restoring it"
	case DriftForeign:
		return "another program's iptables rule keeps IMDS traffic from the proxy; restoring the capture"
	}
	return "iptables rules out of order; restoring the capture"
}

func (m *Manager) setBroken(family Family, err error) {
	m.status.Lock()
	defer m.status.Unlock()
	m.broken[family] = err
}

// describeDrifts names the first drift, and how many more there are.
func describeDrifts(drifts []Drift) string {
	d := drifts[0]
	var s string
	switch d.Kind {
	case DriftMissing:
		s = fmt.Sprintf("%s/%s lacks %s", d.Table, d.Chain, d.Rule)
	case DriftForeign:
		s = fmt.Sprintf("rule %d of %s/%s is another program's: %s", d.Position, d.Table, d.Chain, d.Rule)
	default:
		s = fmt.Sprintf("rule %d of %s/%s is out of order: %s", d.Position, d.Table, d.Chain, d.Rule)
	}
	if len(drifts) > 1 {
		s += fmt.Sprintf(" (and %d more differences)", len(drifts)-1)
	}
	return s
}

// CanMark reports whether this process may set SO_MARK (has NET_ADMIN), by
// trying it on a throw-away socket.
func CanMark(mark uint32) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("probing socket marks: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
		return fmt.Errorf("setting socket mark 0x%x needs NET_ADMIN (or NET_RAW on Linux 5.17+): %w", mark, err)
	}
	return nil
}
