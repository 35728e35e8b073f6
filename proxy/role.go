package proxy

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// Outcomes of the role path when the proxy serves the workload's own role.
const (
	outcomeWorkloadRole            = "workload_role"
	outcomeWorkloadRoleUnavailable = "workload_role_unavailable"
)

// When and how the workload role's source is asked.
const (
	// roleRefreshBefore is how long before they expire the credentials are
	// renewed, in the background. It is longer than the window in which the
	// SDKs' IMDS clients refresh theirs (botocore's is 15 minutes), so that
	// a client that refreshes gets credentials it will keep.
	roleRefreshBefore = 20 * time.Minute
	// roleStillGood is how long before their expiry the last credentials
	// are still served, while the source fails to renew them, as IMDS
	// serves a role's credentials until they expire. Clients given less
	// would ask again at once. Past it, requests wait for new ones.
	roleStillGood = 5 * time.Minute
	// roleTimeout bounds one retrieval. SDKs give IMDS a second or two: a
	// request waits for the source only when there is nothing to serve.
	roleTimeout = 5 * time.Second
	// roleRetryAfter is how long after a failure the source is not asked
	// again, so that a failing source is not asked once per request.
	roleRetryAfter = 2 * time.Second
	// roleRefreshEvery is how often the refresher looks whether the
	// credentials are due, or missing.
	roleRefreshEvery = 30 * time.Second
)

// workloadRole serves Config.WorkloadRole and keeps the books on its source.
type workloadRole struct {
	role              RoleSource
	name, arn, source string
	log               *zap.Logger

	failures prometheus.Counter
	valid    prometheus.Gauge

	mu       sync.Mutex
	last     imdsapi.RoleCredentials // the newest the source gave
	asked    uint64                  // retrievals started, in order
	applied  uint64                  // the latest retrieval whose answer last is, or whose failure was noted
	renewing bool                    // a background renewal is in flight
	failing  bool                    // since the last success; logged once, on the way in and out
	failedAt time.Time
}

func newWorkloadRole(role RoleSource, log *zap.Logger, reg prometheus.Registerer) (*workloadRole, error) {
	name, arn, source := role.Role()
	w := &workloadRole{role: role, name: name, arn: arn, source: source, log: log,
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name:        "imds_proxy_workload_role_failures_total",
			Help:        "Failed retrievals of the workload's own role credentials (--credentials=workload), each outage logged once.",
			ConstLabels: prometheus.Labels{"source": source},
		}),
		valid: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imds_proxy_workload_role_credentials_valid",
			Help: "1 while the proxy holds credentials of the workload's own role good for 5 more minutes, 0 while the role path " +
				"answers 404 for want of them (--credentials=workload).",
			ConstLabels: prometheus.Labels{"source": source},
		}),
	}
	for _, c := range []prometheus.Collector{w.failures, w.valid} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// credentials are what a request is served. While the last credentials
// are good for roleStillGood, they are, at once, and once they are due
// (roleRefreshBefore their expiry) a background renewal replaces them.
// Otherwise the request waits for new ones from the source, unless it
// failed within roleRetryAfter; none if it fails.
func (w *workloadRole) credentials(ctx context.Context) imdsapi.RoleCredentials {
	w.mu.Lock()
	if w.goodFor(roleStillGood) {
		if !w.goodFor(roleRefreshBefore) {
			w.renewInBackground()
		}
		defer w.mu.Unlock()
		return w.last
	}
	resting := w.resting()
	w.mu.Unlock()
	if resting {
		return imdsapi.RoleCredentials{}
	}
	// The request's own end (a client that gave up) is no verdict on the source.
	return w.fetch(context.WithoutCancel(ctx))
}

// resting says whether the source failed within roleRetryAfter, and is not
// to be asked yet. w.mu is held.
func (w *workloadRole) resting() bool {
	return w.failing && time.Since(w.failedAt) < roleRetryAfter
}

// goodFor says whether the last credentials are good for d more. w.mu is held.
func (w *workloadRole) goodFor(d time.Duration) bool {
	return w.last.AccessKeyID != "" && time.Until(w.last.Expiration) >= d
}

// renewInBackground starts a renewal unless one is in flight, the source
// failed within roleRetryAfter, or the last credentials were due when they
// came and are newer than roleRefreshEvery: a source whose credentials
// live less than roleRefreshBefore is not asked on every request. w.mu is
// held.
func (w *workloadRole) renewInBackground() {
	dueOnArrival := w.last.Expiration.Sub(w.last.LastUpdated) < roleRefreshBefore
	if w.renewing || w.resting() || dueOnArrival && time.Since(w.last.LastUpdated) < roleRefreshEvery {
		return
	}
	w.renewing = true
	go func() {
		w.fetch(context.Background())
		w.mu.Lock()
		w.renewing = false
		w.mu.Unlock()
	}()
}

// fetch asks the source for new credentials, within roleTimeout, notes the
// answer, and returns the credentials to serve: the new ones, or, if it
// fails, the last while they are good for roleStillGood, else none. If
// parent ends first, nothing is noted.
func (w *workloadRole) fetch(parent context.Context) imdsapi.RoleCredentials {
	w.mu.Lock()
	w.asked++
	seq, renew := w.asked, w.last.AccessKeyID != ""
	w.mu.Unlock()
	ctx, cancel := context.WithTimeout(parent, roleTimeout)
	defer cancel()
	c, err := w.role.Credentials(ctx, renew)
	w.mu.Lock()
	defer w.mu.Unlock()
	if parent.Err() != nil {
		return imdsapi.RoleCredentials{}
	}
	if seq > w.applied { // an answer older than the one noted last is dropped
		w.applied = seq
		w.note(c, err)
	}
	switch {
	case err == nil: // new, however short they live
		return c
	case w.goodFor(roleStillGood):
		return w.last
	}
	return imdsapi.RoleCredentials{}
}

// note logs a failure once, and the recovery, keeps new credentials, and
// sets the metrics. w.mu is held.
func (w *workloadRole) note(c imdsapi.RoleCredentials, err error) {
	if err != nil {
		w.failures.Inc()
		if !w.failing {
			w.log.Error("the workload's own role credentials cannot be had from its source: the role path serves the last ones "+
				"until "+roleStillGood.String()+" before they expire, then answers 404, as IMDS does where no role is attached "+
				"(the instance's role is never served instead)",
				zap.String("source", w.source), zap.String("role", w.name), zap.Time("last_expiration", w.last.Expiration),
				zap.String("error", truncate(err.Error())))
		}
		w.failing, w.failedAt = true, time.Now()
	} else {
		if w.failing {
			w.log.Info("the workload's own role credentials are had from its source again", zap.String("source", w.source),
				zap.String("role", w.name), zap.Time("expiration", c.Expiration))
		}
		w.last, w.failing = c, false
	}
	w.valid.Set(boolGauge(w.goodFor(roleStillGood)))
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// keepFresh looks every roleRefreshEvery, until ctx ends, whether the
// credentials are due or missing, and renews them, so that no client waits
// for the source and a failing source is noticed with no client asking.
func (w *workloadRole) keepFresh(ctx context.Context) {
	t := time.NewTicker(roleRefreshEvery)
	defer t.Stop()
	for {
		w.mu.Lock()
		due := !w.goodFor(roleRefreshBefore) && !w.resting()
		w.mu.Unlock()
		if due {
			w.fetch(ctx)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// answer answers a request under the role path (workloadRolePath) from
// the workload's own role, as IMDS answers for an instance profile's role:
// security-credentials/ lists the role's name, security-credentials/<name>
// gives its credentials, info names its ARN, and anything else there is
// 404, as is all of it while the source fails and the credentials it gave
// last are not good for roleStillGood.
func (w *workloadRole) answer(ctx context.Context, below string) *ownAnswer {
	var body any
	switch below {
	case roleInfoPath:
		if w.arn == "" {
			return w.notFound(outcomeWorkloadRole)
		}
		c := w.credentials(ctx)
		if c.AccessKeyID == "" {
			return w.notFound(outcomeWorkloadRoleUnavailable)
		}
		body = struct {
			Code               string
			LastUpdated        string
			InstanceProfileArn string
			InstanceProfileId  string
		}{"Success", imdsTime(c.LastUpdated), w.arn, ""}
	case roleCredentialsDir, roleCredentialsDir + "/" + w.name:
		c := w.credentials(ctx)
		if c.AccessKeyID == "" {
			return w.notFound(outcomeWorkloadRoleUnavailable)
		}
		if below == roleCredentialsDir {
			return w.mark(plainAnswer(http.StatusOK, outcomeWorkloadRole, w.name))
		}
		body = struct {
			Code            string
			LastUpdated     string
			Type            string
			AccessKeyId     string
			SecretAccessKey string
			Token           string
			Expiration      string
		}{"Success", imdsTime(c.LastUpdated), "AWS-HMAC", c.AccessKeyID, c.SecretAccessKey, c.Token, imdsTime(c.Expiration)}
	default:
		return w.notFound(outcomeWorkloadRole)
	}
	text, err := json.MarshalIndent(body, "", "  ")
	if err != nil {
		return w.notFound(outcomeWorkloadRoleUnavailable)
	}
	return w.mark(plainAnswer(http.StatusOK, outcomeWorkloadRole, string(text)))
}

func (w *workloadRole) notFound(outcome string) *ownAnswer {
	return w.mark(imdsRefusal(http.StatusNotFound, outcome))
}

// mark names the role's source on the answer, for imds-proxy doctor.
func (w *workloadRole) mark(a *ownAnswer) *ownAnswer {
	return a.with(imdsapi.CredentialsHeader, "workload; source="+w.source)
}

// The role path below its API version (see belowVersion).
const (
	roleCredentialsDir = "/meta-data/iam/security-credentials"
	roleInfoPath       = "/meta-data/iam/info"
)

// workloadRolePath says whether the clean path p is one the workload's own
// role answers: iam/info, and iam/security-credentials and below.
func workloadRolePath(p string) (below string, ok bool) {
	below, versioned := belowVersion(p)
	return below, versioned && (below == roleInfoPath || underPrefix(below, roleCredentialsDir))
}

// imdsTime is IMDS's timestamp format.
func imdsTime(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05Z") }
