package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// sessionState is what the proxy knows about its own IMDSv2 session upstream.
type sessionState int

const (
	// statePending: the first token request has not finished yet.
	statePending sessionState = iota
	// stateV2: the proxy holds an upstream token and adds it to every request.
	stateV2
	// stateV1Fallback: no upstream token could be had; GETs go upstream
	// without one while IMDSv2 is retried in the background.
	stateV1Fallback
	// stateDown: no upstream token and fallback is disabled; clients get 503.
	stateDown
)

var allSessionStates = []sessionState{statePending, stateV2, stateV1Fallback, stateDown}

func (s sessionState) String() string {
	switch s {
	case stateV2:
		return "v2"
	case stateV1Fallback:
		return "v1_fallback"
	case stateDown:
		return "down"
	}
	return "pending"
}

// Causes of a failed upstream token request, the values of the "cause" label.
const (
	causeTimeout     = "timeout"
	causeUnreachable = "unreachable"
	causeRefused     = "refused"
	causeHTTPStatus  = "http_status"
	causeLoop        = "loop"
)

// tokenError is a failed upstream token request with its classified cause.
type tokenError struct {
	cause string
	err   error
}

func (e *tokenError) Error() string { return e.err.Error() }
func (e *tokenError) Unwrap() error { return e.err }

// diagnosis explains a token failure to the operator in terms of its cause and fix.
func (e *tokenError) diagnosis() string {
	switch e.cause {
	case causeTimeout:
		return "the upstream IMDSv2 token request timed out. This is the hop-limit symptom: " +
			"IMDS sends token responses with IP TTL = HttpPutResponseHopLimit (default 1), and they " +
			"die before reaching a network namespace that is one or more forwarding hops away. " +
			"Fix: run imds-proxy in node mode on the host and chain this proxy to it (--upstream), " +
			"or raise the hop limit: aws ec2 modify-instance-metadata-options --instance-id <id> " +
			"--http-put-response-hop-limit 2"
	case causeUnreachable:
		return "the upstream IMDS cannot be reached; check --upstream and that the metadata " +
			"endpoint is enabled (HttpEndpoint=enabled)"
	case causeLoop:
		return "the upstream token request was redirected back to this proxy: the iptables exemption " +
			"does not match its traffic; check --exempt-mark (needs NET_ADMIN) or --exempt-uid"
	case causeRefused:
		return "the upstream refused to issue an IMDSv2 token (403/404/405): it does not support " +
			"IMDSv2 or rejected the request; check --upstream"
	}
	return "the upstream answered the IMDSv2 token request with an unexpected status"
}

// upstreamV1 is what the proxy knows of the upstream's own IMDSv1 policy:
// whether it answers a tokenless GET or refuses it with 401.
type upstreamV1 int32

const (
	// upstreamV1Unknown: not asked yet, or no answer that tells.
	upstreamV1Unknown upstreamV1 = iota
	// upstreamV1Served: a tokenless GET was answered (HttpTokens=optional).
	upstreamV1Served
	// upstreamV1Refused: a tokenless GET got 401 (HttpTokens=required, or a
	// chained imds-proxy that refuses them).
	upstreamV1Refused
)

// allUpstreamV1 are the states, for exporting each at 0 or 1.
func allUpstreamV1() [3]upstreamV1 {
	return [3]upstreamV1{upstreamV1Unknown, upstreamV1Served, upstreamV1Refused}
}

func (u upstreamV1) String() string {
	switch u {
	case upstreamV1Served:
		return "served"
	case upstreamV1Refused:
		return "refused"
	}
	return "unknown"
}

// probePath is what the probe asks for: the metadata root, which every
// IMDS serves and whose answer holds nothing secret. (A path IMDS does not
// have would read nothing, but amazon-ec2-metadata-mock answers it 404
// before it checks tokens, so the tests could not see the 401.)
const probePath = "/latest/meta-data/"

// session keeps one IMDSv2 session with the upstream: a token, refreshed in
// the background well before it expires, and the state that decides how
// client requests are forwarded. It also keeps track of whether the
// upstream serves tokenless requests, which the auto policy follows.
type session struct {
	id        string // imdsapi.LoopHeader value
	cfg       *Config
	transport http.RoundTripper
	log       *zap.Logger
	metrics   *metrics
	// probes says whether the upstream's IMDSv1 policy is asked for: block
	// has no use for the answer, and then no tokenless request goes upstream.
	probes bool
	// v1Changed, if set, is called outside the lock whenever v1 changes, and
	// after the first probe even if it told nothing (err says why).
	v1Changed func(prev, next upstreamV1, err error)

	refreshes singleflight.Group

	mu      sync.Mutex
	state   sessionState
	token   string
	decided chan struct{} // closed once state leaves statePending
	// v1 is read on every tokenless request, so it is atomic; it is written
	// under mu so that transitions are reported once and in order.
	v1 atomic.Int32
	// probed is set once the first probe has finished.
	probed bool
}

func newSession(cfg *Config, id string, transport http.RoundTripper, log *zap.Logger, m *metrics) *session {
	m.setSessionState(statePending)
	m.setUpstreamV1(upstreamV1Unknown)
	return &session{id: id, cfg: cfg, transport: transport, log: log, metrics: m, decided: make(chan struct{}),
		probes: cfg.V1 != imdsapi.V1Block}
}

// run refreshes the session until ctx is cancelled: at half the token's
// lifetime while IMDSv2 works, and with capped exponential backoff while it
// does not. With V1ProbeInterval it also asks the upstream about IMDSv1
// between refreshes. Under auto, while the IMDSv1 answer is unknown, only
// the probe is retried with backoff: the token in hand stays valid.
func (s *session) run(ctx context.Context) {
	backoff := s.cfg.UpstreamRetryMin
	probeEvery := s.cfg.V1ProbeInterval
	reprobe := false
	var refreshed time.Time
	for {
		state := stateV2
		if reprobe && time.Since(refreshed) < s.cfg.UpstreamTokenTTL/2 {
			s.probeV1()
		} else {
			state, _ = s.refresh("")
			refreshed = time.Now()
		}
		wait := s.cfg.UpstreamTokenTTL / 2
		reprobe = state == stateV2 && s.cfg.V1 == imdsapi.V1Auto && s.v1State() == upstreamV1Unknown
		// Under auto an unknown IMDSv1 answer is retried like a failed token
		// request, since tokenless requests are refused until it is known.
		if state != stateV2 || reprobe {
			wait = backoff
			backoff = min(2*backoff, s.cfg.UpstreamRetryMax)
		} else {
			backoff = s.cfg.UpstreamRetryMin
		}
		next := time.Now().Add(wait)
		for {
			step := time.Until(next)
			if s.probes && probeEvery > 0 && probeEvery < step {
				step = probeEvery
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(step):
			}
			if !time.Now().Before(next) {
				break
			}
			s.probeV1()
		}
	}
}

// v1State is the upstream's IMDSv1 policy as last seen.
func (s *session) v1State() upstreamV1 { return upstreamV1(s.v1.Load()) }

// waitDecided waits until the first refresh (token and IMDSv1 probe) is
// over, or ctx ends.
func (s *session) waitDecided(ctx context.Context) {
	select {
	case <-s.decided:
	case <-ctx.Done():
	}
}

// current returns the session state and token, waiting for the first token
// request to finish if it has not yet.
func (s *session) current(ctx context.Context) (sessionState, string, error) {
	select {
	case <-s.decided:
	case <-ctx.Done():
		return statePending, "", ctx.Err()
	}
	snap := s.snapshot()
	return snap.state, snap.token, nil
}

// ready reports an error until the session state has been decided.
func (s *session) ready() error {
	select {
	case <-s.decided:
		return nil
	default:
		return errors.New("upstream IMDSv2 session not decided yet")
	}
}

// refresh fetches a new upstream token unless the token stale has already been
// replaced ("" forces a fetch). Concurrent callers share one upstream request,
// and the staleness check runs inside it so that a caller arriving just after
// a refresh does not start another.
func (s *session) refresh(stale string) (sessionState, string) {
	s.refreshes.Do("token", func() (any, error) {
		if stale == "" || s.snapshot().token == stale {
			tok, err := s.fetchToken()
			// Scheduled refreshes ask about IMDSv1 too, before update: the
			// first requests, released by it, must find the answer known. A
			// refresh for a stale token has a client waiting, and does not.
			// An upstream that cannot be reached, or is this proxy itself,
			// cannot tell.
			var te *tokenError
			if stale == "" && (!errors.As(err, &te) || te.cause != causeUnreachable && te.cause != causeLoop) {
				s.probeV1()
			}
			s.update(tok, err)
		}
		return nil, nil
	})
	snap := s.snapshot()
	return snap.state, snap.token
}

type sessionSnapshot struct {
	state sessionState
	token string
}

func (s *session) snapshot() sessionSnapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return sessionSnapshot{s.state, s.token}
}

// update records the outcome of a token request and logs state transitions
// once, not on every retry.
func (s *session) update(tok string, err error) {
	s.mu.Lock()
	prev := s.state
	switch {
	case err == nil:
		s.state, s.token = stateV2, tok
	case s.cfg.UpstreamV1Fallback:
		s.state, s.token = stateV1Fallback, ""
	default:
		s.state, s.token = stateDown, ""
	}
	next := s.state
	if prev == statePending {
		close(s.decided)
	}
	s.mu.Unlock()

	s.metrics.setSessionState(next)
	var te *tokenError
	if errors.As(err, &te) {
		s.metrics.upstreamTokenErr.WithLabelValues(te.cause).Inc()
	}
	if next == prev {
		return
	}
	switch {
	case next == stateV2:
		s.log.Info("upstream IMDSv2 session established", zap.Stringer("previous_state", prev))
	case te != nil:
		s.log.Error("no upstream IMDSv2 session: "+te.diagnosis(),
			zap.Stringer("state", next), zap.String("cause", te.cause),
			zap.Bool("v1_fallback", s.cfg.UpstreamV1Fallback), zap.Error(err))
	}
}

// fetchToken asks the upstream for a token, bounded by UpstreamTokenTimeout.
func (s *session) fetchToken() (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.UpstreamTokenTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, s.cfg.Upstream.JoinPath(imdsapi.TokenPath).String(), http.NoBody)
	if err != nil {
		return "", &tokenError{cause: causeUnreachable, err: err}
	}
	req.Header.Set(imdsapi.TokenTTLHeader, fmt.Sprint(int(s.cfg.UpstreamTokenTTL.Seconds())))
	req.Header.Set("User-Agent", imdsapi.UserAgent)
	req.Header.Set(imdsapi.LoopHeader, s.id)
	start := time.Now()
	resp, err := s.transport.RoundTrip(req)
	s.metrics.upstreamLatency.WithLabelValues("token").Observe(time.Since(start).Seconds())
	if err != nil {
		return "", classifyTokenError(ctx, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxUpstreamTokenBytes+1))
	if err != nil {
		return "", classifyTokenError(ctx, err)
	}
	switch {
	case resp.StatusCode == http.StatusLoopDetected:
		return "", &tokenError{cause: causeLoop, err: errors.New("upstream token request came back to this proxy")}
	case resp.StatusCode == http.StatusForbidden, resp.StatusCode == http.StatusNotFound,
		resp.StatusCode == http.StatusMethodNotAllowed:
		return "", &tokenError{cause: causeRefused, err: fmt.Errorf("upstream token request: HTTP %d", resp.StatusCode)}
	case resp.StatusCode != http.StatusOK:
		return "", &tokenError{cause: causeHTTPStatus, err: fmt.Errorf("upstream token request: HTTP %d", resp.StatusCode)}
	case len(body) == 0 || len(body) > maxUpstreamTokenBytes:
		return "", &tokenError{cause: causeHTTPStatus, err: fmt.Errorf("upstream token has implausible length %d", len(body))}
	}
	return string(body), nil
}

// probeV1 asks the upstream whether it serves tokenless requests, with a
// tokenless GET of probePath, and records the answer. A 401 means it
// requires tokens; any other answer of the upstream's but a throttle or a
// server error means it does not. An answer that tells nothing keeps what
// was known before.
func (s *session) probeV1() {
	if !s.probes {
		return
	}
	got, err := s.askV1()
	s.mu.Lock()
	prev := s.v1State()
	if got != upstreamV1Unknown {
		s.v1.Store(int32(got))
	}
	next := s.v1State()
	first := !s.probed
	s.probed = true
	s.mu.Unlock()
	if err != nil {
		s.log.Debug("upstream IMDSv1 probe told nothing", zap.Error(err), zap.Stringer("kept", next))
	}
	if next == prev && !first {
		return
	}
	s.metrics.setUpstreamV1(next)
	if s.v1Changed != nil {
		s.v1Changed(prev, next, err)
	}
}

func (s *session) askV1() (upstreamV1, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.UpstreamTokenTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.cfg.Upstream.JoinPath(probePath).String(), http.NoBody)
	if err != nil {
		return upstreamV1Unknown, fmt.Errorf("upstream IMDSv1 probe: %w", err)
	}
	req.Header.Set("User-Agent", imdsapi.UserAgent)
	req.Header.Set(imdsapi.LoopHeader, s.id)
	req.Header.Set(imdsapi.ProbeHeader, "v1")
	start := time.Now()
	resp, err := s.transport.RoundTrip(req)
	s.metrics.upstreamLatency.WithLabelValues("v1_probe").Observe(time.Since(start).Seconds())
	if err != nil {
		return upstreamV1Unknown, fmt.Errorf("upstream IMDSv1 probe: %w", err)
	}
	_, _ = io.CopyN(io.Discard, resp.Body, 64<<10) // the listing itself is of no interest
	resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusUnauthorized:
		return upstreamV1Refused, nil
	case resp.StatusCode == http.StatusTooManyRequests, resp.StatusCode >= 500, resp.StatusCode < 200:
		return upstreamV1Unknown, fmt.Errorf("upstream IMDSv1 probe: HTTP %d", resp.StatusCode)
	}
	return upstreamV1Served, nil
}

func classifyTokenError(ctx context.Context, err error) error {
	var netErr net.Error
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || (errors.As(err, &netErr) && netErr.Timeout()) {
		return &tokenError{cause: causeTimeout, err: fmt.Errorf("upstream token request: %w", err)}
	}
	return &tokenError{cause: causeUnreachable, err: fmt.Errorf("upstream token request: %w", err)}
}
