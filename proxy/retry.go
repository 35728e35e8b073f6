package proxy

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"time"
)

// RetryConfig bounds retries of upstream answers that say "try again":
// 429 (IMDS throttling) and 5xx, and connections refused or reset. Only
// idempotent requests reach the upstream (GET, HEAD), so each may be sent
// again. Timeouts are not retried: a hung upstream costs one timeout.
type RetryConfig struct {
	// Attempts is the most upstream requests one client request causes
	// (1: no retries).
	Attempts int
	// BaseDelay and MaxDelay bound the jittered exponential backoff.
	BaseDelay, MaxDelay time.Duration
}

// DefaultRetryConfig retries twice, waiting up to 50 ms then 100 ms.
func DefaultRetryConfig() RetryConfig {
	return RetryConfig{Attempts: 3, BaseDelay: 50 * time.Millisecond, MaxDelay: time.Second}
}

func retryable(status int) bool {
	return status == http.StatusTooManyRequests || status >= 500 && status != http.StatusLoopDetected
}

// fetchRetrying fetches req and reads the answer, retrying what may
// succeed next time. The last attempt's answer or error is returned.
func (f *forwarder) fetchRetrying(req *http.Request) (*sharedResponse, error) {
	for attempt := 1; ; attempt++ {
		resp, err := f.fetchWhole(req)
		cause := retryCause(resp, err)
		if cause == "" || attempt >= f.retry.Attempts || sleep(req.Context(), f.backoff(attempt)) != nil {
			return resp, err
		}
		f.metrics.upstreamRetries.WithLabelValues(cause).Inc()
	}
}

func (f *forwarder) fetchWhole(req *http.Request) (*sharedResponse, error) {
	resp, unavailable, err := f.fetch(req)
	if err != nil {
		return nil, err
	}
	return readShared(resp, unavailable)
}

// retryCause is the metric label of a retryable outcome, or "".
func retryCause(resp *sharedResponse, err error) string {
	if err != nil {
		var netErr net.Error
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
			errors.As(err, &netErr) && netErr.Timeout() || errors.Is(err, errTooLarge) {
			return "" // a hang costs one timeout, not one per attempt
		}
		return "connection"
	}
	switch {
	case resp.unavailable:
		return "" // the proxy's own 503: the session is down, retrying won't help
	case resp.header.Get(proxyHeader) != "":
		return "" // a chained imds-proxy has retried already: retrying again multiplies
	case resp.status == http.StatusTooManyRequests:
		return "throttled"
	case retryable(resp.status):
		return "server_error"
	}
	return ""
}

// backoff is a full-jitter exponential delay before retry number attempt.
func (f *forwarder) backoff(attempt int) time.Duration {
	ceiling := min(f.retry.BaseDelay<<(attempt-1), f.retry.MaxDelay)
	return time.Duration(rand.Int64N(int64(ceiling) + 1))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
