package iptables

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// Exemption is how a sidecar's redirect lets the proxy's own upstream
// connections through, so that they are not redirected back to the proxy.
// A node agent's redirect takes forwarded traffic only, never the node's
// own, and needs none.
type Exemption struct {
	Mode imdsapi.Mode
	// Redirects says the proxy installs the redirect itself (--rules);
	// otherwise an init container's rules exempt the mark or UID.
	Redirects bool
	// Cgroup is the proxy's own cgroup, which the rules then exempt
	// instead of Mark and UID; "" for none (WithOwnCgroup chooses it).
	Cgroup string
	// Mark is the socket mark exempted (--exempt-mark), 0 for none.
	Mark uint32
	// UID is the UID exempted (--exempt-uid), negative for none.
	UID int
}

// WithOwnCgroup is e with the cgroup a redirecting sidecar's rules exempt:
// its own (what own finds, OwnCgroup outside tests) when wanted and usable,
// else none, and the rules fall back to the socket mark or UID, which app
// containers can forge. The log says which and why.
func (e Exemption) WithOwnCgroup(want bool, own func() (string, error), log *zap.Logger) Exemption {
	if e.Mode != imdsapi.ModeSidecar || !e.Redirects {
		return e
	}
	forgeable := "the redirect exempts the proxy by socket mark or UID, which an app container can forge with " +
		"NET_RAW (Linux 5.17+) or CAP_SETUID, default capabilities of Docker and containerd"
	if !want {
		log.Warn(forgeable, zap.String("reason", "--exempt-cgroup off"))
		return e
	}
	path, err := own()
	if err != nil {
		log.Warn(forgeable, zap.String("reason", "the cgroup exemption is unavailable"), zap.Error(err))
		return e
	}
	log.Info("the redirect exempts the proxy's own cgroup, which app containers cannot join", zap.String("cgroup", path))
	e.Cgroup = path
	return e
}

// Kind is the exemption the proxy's own redirect uses: cgroup, mark, uid,
// or none without a sidecar redirect of its own.
func (e Exemption) Kind() string {
	switch {
	case e.Mode != imdsapi.ModeSidecar || !e.Redirects:
	case e.Cgroup != "":
		return "cgroup"
	case e.Mark != 0:
		return "mark"
	case e.UID >= 0:
		return "uid"
	}
	return "none"
}

// Gauge is imds_proxy_redirect_exemption{kind}: 1 for Kind.
func (e Exemption) Gauge() prometheus.Collector {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "imds_proxy_redirect_exemption",
		Help: "How the sidecar's redirect lets the proxy's own connections through: cgroup (unforgeable by app containers), mark or uid (forgeable), none."}, []string{"kind"})
	g.WithLabelValues(e.Kind()).Set(1)
	return g
}

// UpstreamMark is the socket mark the proxy puts on its upstream
// connections so that a sidecar redirect lets them through: Mark, if
// canMark (CanMark outside tests) says the proxy may set it. It is 0 where
// no mark is needed (a node agent, or a sidecar exempting its own cgroup)
// and where the mark cannot be set but the UID exemption covers the proxy;
// then unmarked says why. err says why the proxy must not start: as any UID
// but the exempted one (euid is its own), or with no exemption at all, its
// upstream connections would be redirected back to itself.
func (e Exemption) UpstreamMark(canMark func(uint32) error, euid int) (mark uint32, unmarked, err error) {
	if e.Mode != imdsapi.ModeSidecar || e.Cgroup != "" {
		return 0, nil, nil
	}
	unmarked = errors.New("--exempt-mark is 0")
	if e.Mark != 0 {
		unmarked = canMark(e.Mark)
	}
	switch {
	case unmarked == nil:
		return e.Mark, nil, nil
	case e.UID >= 0 && euid != e.UID:
		return 0, nil, fmt.Errorf("--exempt-uid %d, but the proxy runs as UID %d and cannot mark its sockets (%v): "+
			"its upstream connections would be redirected back to itself", e.UID, euid, unmarked)
	case e.UID < 0 && e.Redirects:
		return 0, nil, fmt.Errorf("--rules: %w; give the proxy NET_ADMIN, or run it as a dedicated UID with --exempt-uid", unmarked)
	}
	return 0, unmarked, nil
}

// DialControl is the net.Dialer Control of the proxy's upstream
// connections: MarkControl of UpstreamMark, or nil when they go unmarked,
// which the log says with the reason.
func (e Exemption) DialControl(log *zap.Logger) (func(string, string, syscall.RawConn) error, error) {
	mark, unmarked, err := e.UpstreamMark(CanMark, os.Geteuid())
	switch {
	case err != nil:
		return nil, err
	case mark != 0:
		return MarkControl(mark), nil
	case unmarked != nil:
		log.Info("upstream connections are not marked", zap.Error(unmarked))
	}
	return nil, nil
}
