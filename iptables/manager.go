package iptables

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// DefaultExemptMark is the socket mark the sidecar puts on its own upstream
// connections so that they are not redirected back to itself.
const DefaultExemptMark = 0x1169

// MarkControl returns a net.Dialer Control function that sets SO_MARK on
// every socket. Setting a mark needs NET_ADMIN; an error here means the proxy
// lacks it and should use --exempt-uid instead.
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
// periodically and restores what someone else deleted, and removes on
// request.
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
}

// NewManager opens the iptables binaries for the given families. IPv6 is
// skipped, with a log line, when ip6tables does not work in this namespace.
func NewManager(cfg Config, backend Backend, families []Family, log *zap.Logger) (*Manager, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid iptables configuration: %w", err)
	}
	m := &Manager{cfg: cfg, log: log}
	for _, family := range families {
		table, err := Open(family, backend)
		if err == nil && family == IPv6 {
			_, err = table.ipt.ListChains("nat")
		}
		if err != nil {
			if family == IPv6 {
				log.Warn("IPv6 IMDS traffic will not be redirected: ip6tables does not work here", zap.Error(err))
				continue
			}
			return nil, err
		}
		m.tables = append(m.tables, table)
		m.rulesets = append(m.rulesets, Build(cfg, family))
	}
	return m, nil
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

// Drop stops managing family; call it before Install.
func (m *Manager) Drop(family Family) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, t := range m.tables {
		if t.family == family {
			m.tables = append(m.tables[:i], m.tables[i+1:]...)
			m.rulesets = append(m.rulesets[:i], m.rulesets[i+1:]...)
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
	m.ready.Store(true)
	m.checkInterfaces()
	return nil
}

// checkDelivery logs, each time the answer changes, whether traffic the
// node rules send would reach the listener (what /readyz also reports).
func (m *Manager) checkDelivery() {
	if m.cfg.Mode != ModeNode {
		return
	}
	reason := ""
	if err := m.Ready(); err != nil {
		reason = err.Error()
	}
	switch {
	case reason == m.undelivered:
	case reason != "":
		m.log.Error("redirected IMDS traffic would not reach the proxy; not ready", zap.String("reason", reason))
	default:
		m.log.Info("redirected IMDS traffic reaches the proxy again", zap.String("node_address", m.cfg.NodeAddress.String()))
	}
	m.undelivered = reason
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

// Ready reports an error until the rules are installed and, in node mode,
// while the traffic they send would not reach the listener.
func (m *Manager) Ready() error {
	if !m.ready.Load() {
		return errors.New("iptables redirect rules not installed")
	}
	if m.cfg.Mode == ModeNode {
		return CheckDelivery(netip.AddrPortFrom(m.cfg.NodeAddress, uint16(m.cfg.ProxyPort)))
	}
	return nil
}

// checkInterfaces logs, each time the answer changes, which --interfaces
// patterns match no interface of this node: a pattern that matches nothing
// (a CNI's other naming) leaves its containers without the proxy.
func (m *Manager) checkInterfaces() {
	if m.cfg.Mode != ModeNode {
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
// any that are missing; in node mode it also logs when redirected traffic
// stops or starts reaching the listener, first at once.
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
	for i, table := range m.tables {
		missing, err := table.Missing(m.rulesets[i])
		if err != nil {
			m.log.Error("checking iptables rules", zap.String("family", string(table.family)), zap.Error(err))
			continue
		}
		if len(missing) == 0 {
			continue
		}
		for _, r := range missing {
			m.log.Warn("iptables rule missing; restoring it", zap.String("family", string(table.family)),
				zap.String("table", r.Table), zap.String("chain", r.Chain), zap.Strings("rule", r.Spec))
		}
		if err := table.Install(m.rulesets[i]); err != nil {
			m.log.Error("restoring iptables rules", zap.String("family", string(table.family)), zap.Error(err))
		}
	}
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
		return fmt.Errorf("setting socket mark 0x%x needs NET_ADMIN: %w", mark, err)
	}
	return nil
}
