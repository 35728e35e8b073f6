package proxy

import (
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/workload"
)

// Request outcomes, the values of the "outcome" label. The set is fixed so
// that hostile traffic cannot grow label cardinality.
const (
	outcomeForwarded           = "forwarded"
	outcomeTokenIssued         = "token_issued"
	outcomeTokenRefused        = "token_refused"
	outcomeUnauthorized        = "unauthorized"
	outcomeV1Blocked           = "v1_blocked"
	outcomeBadRequest          = "bad_request"
	outcomeMethodNotAllowed    = "method_not_allowed"
	outcomeNotAProxy           = "not_a_forward_proxy"
	outcomeUpstreamError       = "upstream_error"
	outcomeUpstreamTimeout     = "upstream_timeout"
	outcomeUpstreamUnavailable = "upstream_unavailable"
	outcomeLoop                = "loop_detected"
	outcomePathDenied          = "path_denied"
	outcomeHeaderTooLarge      = "header_too_large"
	outcomeBodyTooLarge        = "body_too_large"
	outcomeTooManyConnections  = "too_many_connections"
	outcomeV1Probe             = "v1_policy_probe"
	outcomeIdentityGuarded     = "identity_guarded"
)

// metrics holds the proxy's Prometheus collectors.
type metrics struct {
	requests         *prometheus.CounterVec
	tokensMinted     prometheus.Counter
	upstreamLatency  *prometheus.HistogramVec
	sessionState     *prometheus.GaugeVec
	upstreamTokenErr *prometheus.CounterVec
	v1WouldBlock     prometheus.Counter
	v1BySDK          *prometheus.CounterVec
	v1CallersEvicted *prometheus.CounterVec
	v1Policy         *prometheus.GaugeVec
	upstreamV1       *prometheus.GaugeVec
	cache            *prometheus.CounterVec
	cacheEntries     prometheus.Gauge
	cacheBytes       prometheus.Gauge
	upstreamRetries  *prometheus.CounterVec

	workloadRequests *prometheus.CounterVec
	workloads        *boundedSet

	attributionsSkipped       prometheus.Counter
	connectionsOpen           prometheus.Gauge
	connectionsIdle           prometheus.Gauge
	connectionsRejected       *prometheus.CounterVec
	connectionsReclaimed      prometheus.Counter
	connectionsWithoutRequest prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imds_proxy_requests_total",
			Help: "Client requests by method, outcome and IMDS version (v1 = no token, v2 = token).",
		}, []string{"method", "outcome", "imds_version"}),
		tokensMinted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imds_proxy_tokens_minted_total",
			Help: "IMDSv2 session tokens minted for clients.",
		}),
		upstreamLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "imds_proxy_upstream_request_duration_seconds",
			Help:    "Time to response headers for requests to the upstream IMDS, by kind (metadata, token).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"kind"}),
		sessionState: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "imds_proxy_upstream_session_state",
			Help: "1 for the current state of the upstream IMDSv2 session: pending, v2, v1_fallback or down.",
		}, []string{"state"}),
		upstreamTokenErr: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imds_proxy_upstream_token_failures_total",
			Help: "Failed upstream token requests by cause; cause=timeout is the hop-limit symptom.",
		}, []string{"cause"}),
		v1BySDK: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imds_proxy_v1_requests_by_sdk_total",
			Help: "Tokenless (IMDSv1) requests by client family from the User-Agent (a fixed set, other, none).",
		}, []string{"sdk"}),
		v1CallersEvicted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imds_proxy_v1_callers_evicted_total",
			Help: "Rows dropped from the /v1-callers table: reason=quota, a caller past its share replaced its own oldest row " +
				"(one caller flooding the table); reason=full, the table was full and the caller holding the most lost its oldest row.",
		}, []string{"reason"}),
		v1Policy: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "imds_proxy_v1_policy",
			Help: "1 for the IMDSv1 policy in force (effective: allow, warn or block) under the configured one (--v1: auto, allow, warn or block).",
		}, []string{"configured", "effective"}),
		upstreamV1: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "imds_proxy_upstream_v1_state",
			Help: "1 for what the upstream does with a tokenless GET, as last probed: served, refused (401: tokens required) or unknown (not probed under --v1 block).",
		}, []string{"state"}),
		v1WouldBlock: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imds_proxy_v1_would_block_total",
			Help: "Tokenless requests that --v1 block refuses, under every policy: served under allow and warn (a dry run), refused under block and a blocking auto (also counted as outcome=\"v1_blocked\").",
		}),
		cache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imds_proxy_cache_requests_total",
			Help: "Cache use: hit (a client request answered from the cache), miss (an upstream fetch of a cacheable path), " +
				"stale (an upstream error answered with an expired copy), uncached (an upstream fetch of a path never cached), " +
				"coalesced (a client request that shared another's upstream fetch).",
		}, []string{"result"}),
		cacheEntries: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imds_proxy_cache_entries",
			Help: "Upstream answers in the cache.",
		}),
		cacheBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imds_proxy_cache_bytes",
			Help: "Body bytes of the upstream answers in the cache.",
		}),
		upstreamRetries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imds_proxy_upstream_retries_total",
			Help: "Upstream metadata requests sent again, by cause: throttled (429), server_error (5xx), connection (refused or reset).",
		}, []string{"cause"}),
		workloadRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imds_proxy_workload_requests_total",
			Help: "Client requests by the caller's workload (Kubernetes namespace and top owner, ECS cluster and task definition, " +
				"or Docker container name), IMDS version, and for IMDSv1 the policy applied to them and the client family from the User-Agent " +
				"(the sdk label of imds_proxy_v1_requests_by_sdk_total). A node agent knows the workload; " +
				"the first " + strconv.Itoa(maxWorkloadSeries) + " workloads get series of their own, later ones count as namespace=\"other\", workload=\"other\"; " +
				"callers no source knows count as workload=\"unknown\".",
		}, []string{"namespace", "workload", "imds_version", "v1_policy", "sdk"}),
		workloads: newBoundedSet(maxWorkloadSeries),
		attributionsSkipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imds_proxy_v1_attributions_skipped_total",
			Help: "Tokenless requests logged without their process because attribution (a /proc scan) was over its rate bound.",
		}),
		connectionsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imds_proxy_connections_open",
			Help: "Client connections the proxy holds now (see --max-connections).",
		}),
		connectionsIdle: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imds_proxy_connections_idle",
			Help: "Client keep-alive connections idle between requests now: those a new connection past a limit may reclaim.",
		}),
		connectionsRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imds_proxy_connections_rejected_total",
			Help: "Connections past a limit with no idle keep-alive connection to reclaim: their request is answered 503 and they are closed. " +
				"limit=total: --max-connections; limit=per_client: --max-connections-per-client (one address, a greedy client).",
		}, []string{"limit"}),
		connectionsReclaimed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imds_proxy_connections_reclaimed_total",
			Help: "Idle keep-alive connections closed to make room for a new one past --max-connections or --max-connections-per-client.",
		}),
		connectionsWithoutRequest: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imds_proxy_connections_closed_without_request_total",
			Help: "Connections closed before a whole request arrived: read-header timeouts (slow clients) and clients that left.",
		}),
	}
	for _, c := range []prometheus.Collector{m.attributionsSkipped, m.connectionsOpen, m.connectionsIdle, m.connectionsRejected, m.connectionsReclaimed, m.connectionsWithoutRequest, m.requests, m.tokensMinted, m.upstreamLatency, m.sessionState, m.upstreamTokenErr,
		m.v1WouldBlock, m.v1BySDK, m.v1CallersEvicted, m.v1Policy, m.upstreamV1, m.cache, m.cacheEntries, m.cacheBytes, m.upstreamRetries, m.workloadRequests} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	for _, limit := range []string{limitTotal, limitPerClient} {
		m.connectionsRejected.WithLabelValues(limit) // exported at 0 from the start
	}
	for _, reason := range []string{evictedQuota, evictedFull} {
		m.v1CallersEvicted.WithLabelValues(reason)
	}
	return m, nil
}

func (m *metrics) setSessionState(s sessionState) {
	for _, each := range allSessionStates {
		v := 0.0
		if each == s {
			v = 1
		}
		m.sessionState.WithLabelValues(each.String()).Set(v)
	}
}

func (m *metrics) setUpstreamV1(u upstreamV1) {
	for _, each := range allUpstreamV1() {
		v := 0.0
		if each == u {
			v = 1
		}
		m.upstreamV1.WithLabelValues(each.String()).Set(v)
	}
}

func (m *metrics) setV1Policy(configured, effective imdsapi.V1Policy) {
	for _, each := range []imdsapi.V1Policy{imdsapi.V1Allow, imdsapi.V1Warn, imdsapi.V1Block} {
		v := 0.0
		if each == effective {
			v = 1
		}
		m.v1Policy.WithLabelValues(string(configured), string(each)).Set(v)
	}
}

func (m *metrics) setCacheSize(entries, bytes int) {
	m.cacheEntries.Set(float64(entries))
	m.cacheBytes.Set(float64(bytes))
}

// maxWorkloadSeries bounds the workloads imds_proxy_workload_requests_total
// names: workloads, not pods, so that a node's churn does not grow it.
const maxWorkloadSeries = 256

// countWorkload counts one request of workload w, with the IMDSv1 policy
// applied to it and its client family ("" for IMDSv2).
func (m *metrics) countWorkload(w workload.Workload, version string, policy imdsapi.V1Policy, sdk string) {
	namespace, name := w.Namespace, w.Name
	switch {
	case !w.Known():
		namespace, name = "", "unknown"
	case !m.workloads.admit(namespace + "/" + name):
		namespace, name = "other", "other"
	}
	m.workloadRequests.WithLabelValues(namespace, name, version, string(policy), sdk).Inc()
}

// boundedSet admits its first max members, and those again.
type boundedSet struct {
	mu      sync.Mutex
	max     int
	members map[string]struct{}
}

func newBoundedSet(max int) *boundedSet {
	return &boundedSet{max: max, members: map[string]struct{}{}}
}

// admit says whether key is a member, making it one while there is room.
func (s *boundedSet) admit(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.members[key]; ok {
		return true
	}
	if len(s.members) >= s.max {
		return false
	}
	s.members[key] = struct{}{}
	return true
}

// methodLabel bounds the method label to the methods IMDS knows.
func methodLabel(method string) string {
	switch method {
	case "GET", "HEAD", "PUT":
		return method
	}
	return "other"
}
