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

// Bounds on asking the workload role's source.
const (
	// roleTimeout bounds one retrieval that a request waits for. SDKs give
	// IMDS a second or two; the refresher keeps requests from waiting at all.
	roleTimeout = 5 * time.Second
	// roleRetryAfter is how long after a failure requests are answered
	// without asking the source again (the last credentials, or 404), so
	// that a failing source is not asked once per request.
	roleRetryAfter = 2 * time.Second
	// roleRefreshEvery is how often the refresher asks the role, which
	// goes to its source when its credentials are due.
	roleRefreshEvery = 30 * time.Second
	// roleStillGood is how long before their expiry the credentials the
	// source gave last are still served while it fails to replace them, as
	// IMDS serves a role's credentials until they expire. Clients given
	// less would ask again at once.
	roleStillGood = 5 * time.Minute
)

// workloadRole serves Config.WorkloadRole and keeps the books on its source.
type workloadRole struct {
	role              RoleSource
	name, arn, source string
	log               *zap.Logger

	failures prometheus.Counter
	valid    prometheus.Gauge

	mu       sync.Mutex
	last     imdsapi.RoleCredentials // the source's last credentials
	failing  bool                    // since the last success; logged once, on the way in and out
	failedAt time.Time
	lastErr  error
}

func newWorkloadRole(role RoleSource, log *zap.Logger, reg prometheus.Registerer) (*workloadRole, error) {
	name, arn, source := role.Role()
	w := &workloadRole{role: role, name: name, arn: arn, source: source, log: log,
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name:        "imds_proxy_workload_role_failures_total",
			Help:        "Failed retrievals of the workload's own role credentials (--credentials=workload), each logged once per outage.",
			ConstLabels: prometheus.Labels{"source": source},
		}),
		valid: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imds_proxy_workload_role_credentials_valid",
			Help: "1 while the proxy holds unexpired credentials of the workload's own role, 0 while the role path answers 404 " +
				"for want of them (--credentials=workload).",
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

// credentials are the role's credentials. While its source fails (asked
// again roleRetryAfter after a failure), the error says why, and the
// credentials are the ones it gave last while they are good for
// roleStillGood, else none.
func (w *workloadRole) credentials(ctx context.Context) (imdsapi.RoleCredentials, error) {
	w.mu.Lock()
	if w.failing && time.Since(w.failedAt) < roleRetryAfter {
		defer w.mu.Unlock()
		return w.stillGood(), w.lastErr
	}
	w.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, roleTimeout)
	defer cancel()
	c, err := w.role.Credentials(ctx)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.note(c, err)
	if err != nil {
		return w.stillGood(), err
	}
	return c, nil
}

// stillGood are the source's last credentials while they are good for
// roleStillGood, else none. w.mu is held.
func (w *workloadRole) stillGood() imdsapi.RoleCredentials {
	if time.Until(w.last.Expiration) < roleStillGood {
		return imdsapi.RoleCredentials{}
	}
	return w.last
}

// note logs a failure once, and the recovery, and sets the metrics. w.mu
// is held.
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
		w.failing, w.failedAt, w.lastErr = true, time.Now(), err
		w.valid.Set(boolGauge(w.stillGood().AccessKeyID != ""))
		return
	}
	w.valid.Set(1)
	if w.failing {
		w.log.Info("the workload's own role credentials are had from its source again", zap.String("source", w.source),
			zap.String("role", w.name), zap.Time("expiration", c.Expiration))
	}
	w.last, w.failing, w.lastErr = c, false, nil
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// keepFresh asks for the credentials every roleRefreshEvery until ctx
// ends, so that they are replaced before they expire without a client
// waiting on the source, and a failing source is noticed with no client.
func (w *workloadRole) keepFresh(ctx context.Context) {
	t := time.NewTicker(roleRefreshEvery)
	defer t.Stop()
	for {
		_, _ = w.credentials(ctx)
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
		c, _ := w.credentials(ctx)
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
		c, _ := w.credentials(ctx)
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
