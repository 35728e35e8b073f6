package proxy

import (
	"context"
	"net/http"

	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/workload"
)

// noteV1 keeps the books on a tokenless request, whatever the policy did
// with it: /v1-callers, the per-caller log, and the IMDSv1 metrics.
func (p *Proxy) noteV1(r *http.Request, x *exchange, policy imdsapi.V1Policy) {
	x.policy = policy
	proc, attributed := p.attribute(x)
	if own := p.cfg.Workloads.Workload(proc.Container); own.Known() {
		// The process's own container, where the connection's namespace
		// holds several (a pod's, a task's).
		x.workload = own
	}
	if attributed {
		p.callers.record(x.caller.String(), r.UserAgent(), r.URL.Path, proc, x.workload, policy, x.start)
	} else {
		proc = p.callers.recordUnattributed(x.caller.String(), r.UserAgent(), r.URL.Path, x.workload, policy, x.start)
	}
	p.logV1(r, x, proc, policy)
	p.metrics.v1BySDK.WithLabelValues(x.sdk).Inc()
	// Counted under every policy: it is the number operators watch fall
	// to zero before they require tokens, whatever this proxy does now.
	p.metrics.v1WouldBlock.Inc()
}

// attribute finds the process behind an IMDSv1 request where the proxy can
// see it: in its own network namespace (a sidecar), or in the namespace a
// node agent traced the connection to. attributed is false when the lookup
// was skipped, over its rate bound. A process chooses its command, its
// executable's path and its cgroup's name: they are cut like every client
// string that reaches logs and the callers table.
func (p *Proxy) attribute(x *exchange) (proc attribution.Process, attributed bool) {
	if !x.client.IsValid() {
		return attribution.Process{}, true
	}
	if !p.attributions.Allow() {
		p.metrics.attributionsSkipped.Inc()
		return attribution.Process{}, false
	}
	x.trace(p.cfg.Workloads) // its namespace, where a node agent knew its workload by address

	if x.who.Traced {
		proc = p.attributor.LookupIn(x.who.Namespace, x.client)
	} else {
		proc = p.attributor.Lookup(x.client)
	}
	proc.Command, proc.Executable, proc.Cgroup = truncate(proc.Command), truncate(proc.Executable), truncate(proc.Cgroup)
	return proc, true
}

// logV1 logs a tokenless request within the per-caller log limit: every
// field a client chose is truncated, and a flood from one caller costs a
// few lines and a summary, not a line per request.
func (p *Proxy) logV1(r *http.Request, x *exchange, proc attribution.Process, policy imdsapi.V1Policy) {
	key := logKey{kind: logKindV1, caller: x.caller.String(), uid: uidOf(proc)}
	if !p.logs.allow(key, r.URL.Path, r.UserAgent()) {
		return
	}
	msg := "IMDSv1 request (no token)"
	if policy == imdsapi.V1Warn {
		msg = "IMDSv1 request (no token): --v1 block would refuse it"
	}
	p.log.Warn(msg, append(workloadFields(x.workload), zap.String("method", r.Method), zap.String("path", truncate(r.URL.Path)),
		zap.String("user_agent", truncate(r.UserAgent())), zap.String("caller", x.caller.String()),
		zap.String("policy", string(policy)), zap.String("configured_policy", string(p.cfg.V1)),
		zap.Intp("uid", proc.UID), zap.Int("pid", proc.PID),
		zap.String("command", proc.Command), zap.String("executable", proc.Executable),
		zap.String("container_id", proc.ID))...)
}

// workloadFields name w in a log line, where it is known.
func workloadFields(w workload.Workload) []zap.Field {
	if !w.Known() {
		return nil
	}
	return []zap.Field{zap.String("platform", w.Platform), zap.String("namespace", w.Namespace),
		zap.String("workload", w.Name), zap.String("pod", w.Pod), zap.String("container", w.Container)}
}

// v1Policy is the IMDSv1 policy in force now for workload w: w's own
// setting raised to the floor, or else the configured one. auto is block
// while the upstream refuses tokenless requests or nobody knows yet whether
// it does, and allow once it is known to serve them.
func (p *Proxy) v1Policy(ctx context.Context, w workload.Workload) imdsapi.V1Policy {
	policy := p.cfg.V1
	own, set, err := w.V1Policy()
	switch {
	case set:
		policy = imdsapi.AtLeast(own, p.cfg.V1Floor)
	case err != nil && p.logs.allow(logKey{kind: logKindBadSetting, caller: w.String(), uid: -1}, "", ""):
		p.log.Warn("a workload's IMDSv1 setting is no policy: the configured one applies to it",
			append(workloadFields(w), zap.Error(err), zap.String("policy", string(p.cfg.V1)))...)
	}
	if policy != imdsapi.V1Auto {
		return policy
	}
	// A request that arrives before the first probe has answered waits for
	// it, rather than being refused for want of an answer.
	p.session.waitDecided(ctx)
	return effectiveV1(policy, p.session.v1State())
}

func effectiveV1(configured imdsapi.V1Policy, upstream upstreamV1) imdsapi.V1Policy {
	switch {
	case configured != imdsapi.V1Auto:
		return configured
	case upstream == upstreamV1Served:
		return imdsapi.V1Allow
	}
	return imdsapi.V1Block
}

// v1StateChanged reports what the upstream's IMDSv1 policy, as probed,
// means here: in imds_proxy_v1_policy, and in the log when it changed or
// the first probe could not tell (err says why).
func (p *Proxy) v1StateChanged(prev, next upstreamV1, err error) {
	p.metrics.setV1Policy(p.cfg.V1, effectiveV1(p.cfg.V1, next))
	if prev == next && next != upstreamV1Unknown {
		return
	}
	fields := []zap.Field{zap.String("configured_policy", string(p.cfg.V1)),
		zap.String("policy", string(effectiveV1(p.cfg.V1, next))), zap.Stringer("upstream_v1", next)}
	if err != nil {
		fields = append(fields, zap.Error(err))
	}
	switch {
	case p.cfg.V1 == imdsapi.V1Auto && next == upstreamV1Refused:
		p.log.Info("the upstream refuses tokenless (IMDSv1) requests: --v1 auto refuses them here too", fields...)
	case p.cfg.V1 == imdsapi.V1Auto && next == upstreamV1Served:
		p.log.Info("the upstream serves tokenless (IMDSv1) requests: --v1 auto serves them here too", fields...)
	case p.cfg.V1 == imdsapi.V1Auto:
		p.log.Warn("cannot tell whether the upstream serves tokenless (IMDSv1) requests: "+
			"--v1 auto refuses them until it can", fields...)
	case next == upstreamV1Refused && (p.cfg.V1 == imdsapi.V1Allow || p.cfg.V1 == imdsapi.V1Warn):
		p.log.Warn("--v1 "+string(p.cfg.V1)+" re-opens IMDSv1, which the upstream refuses (tokens are required there): "+
			"a tokenless request, such as a container's SSRF, gets metadata and role credentials through this proxy's "+
			"own token; use --v1 auto (the default) or block unless callers still need IMDSv1 during a migration", fields...)
	}
}
