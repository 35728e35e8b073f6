package proxy

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"syscall"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
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
	switch {
	case err != nil && connectionLost(err):
		return "connection"
	case err != nil:
		return "" // a hang costs one timeout, not one per attempt; garbage stays garbage
	case resp.unavailable:
		return "" // the proxy's own answer: the session is down, retrying won't help
	case resp.header.Get(imdsapi.ProxyHeader) != "":
		return "" // a chained imds-proxy has retried already: retrying again multiplies
	case resp.status == http.StatusTooManyRequests:
		return "throttled"
	case retryable(resp.status):
		return "server_error"
	}
	return ""
}

// connectionLost says whether err is a connection refused, reset or closed
// before the whole answer arrived: what a restarting or overloaded upstream
// does, and what the next attempt may not meet.
func connectionLost(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
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
