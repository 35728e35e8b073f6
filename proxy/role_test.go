package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imds-proxy/imds-proxy/workload"
	"github.com/imds-proxy/imds-proxy/workloadrole"
)

// scriptedSource is a workload role's source whose answers the test
// changes: credentials expiring in expiresIn, with a new access key each
// time, or err.
type scriptedSource struct {
	mu        sync.Mutex
	calls     int
	expiresIn time.Duration
	err       error
	delay     time.Duration
	expires   time.Time // of the credentials it gave last
}

func (s *scriptedSource) Retrieve(ctx context.Context) (aws.Credentials, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-time.After(s.delay):
	case <-ctx.Done():
		return aws.Credentials{}, ctx.Err()
	}
	s.calls++
	if s.err != nil {
		return aws.Credentials{}, s.err
	}
	s.expires = time.Now().Add(s.expiresIn).Truncate(time.Second)
	return aws.Credentials{AccessKeyID: fmt.Sprintf("ASIAKEY%d", s.calls), SecretAccessKey: "secret", SessionToken: "token",
		CanExpire: true, Expires: s.expires}, nil
}

// eventually waits up to 2 s for cond.
func eventually(t *testing.T, cond func() bool, what string) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 2s", what)
		}
	}
}

func (s *scriptedSource) set(expiresIn time.Duration, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.expiresIn, s.err = expiresIn, err
}

func (s *scriptedSource) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

// TestWorkloadRoleAnswers: the role path answers in IMDS's shapes from the
// workload's own role; credentials within roleRefreshBefore of their expiry
// are served at once and renewed in the background; while the source
// fails, the last credentials are served until roleStillGood before they
// expire, then the role path answers 404; the failure is logged once with
// its cause and once on recovery, and the source is asked again only after
// roleRetryAfter; the metrics follow.
func TestWorkloadRoleAnswers(t *testing.T) {
	source := &scriptedSource{expiresIn: 6 * time.Hour}
	core, logs := observer.New(zap.InfoLevel)
	w, err := newWorkloadRole(workloadrole.New("arn:aws:iam::111122223333:role/team/web-role", workload.IdentityTaskRole, source),
		zap.New(core), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	if a := w.answer(ctx, roleCredentialsDir); a.status != http.StatusOK || a.body != "web-role" {
		t.Errorf("security-credentials/: %d %q, want 200 and the role's name", a.status, a.body)
	}
	var creds map[string]string
	a := w.answer(ctx, roleCredentialsDir+"/web-role")
	if err := json.Unmarshal([]byte(a.body), &creds); err != nil || a.status != http.StatusOK {
		t.Fatalf("security-credentials/web-role: %d %q: %v", a.status, a.body, err)
	}
	for _, field := range []string{"Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"} {
		if creds[field] == "" {
			t.Errorf("the credentials lack %s: %s", field, a.body)
		}
	}
	if len(creds) != 7 || creds["Code"] != "Success" || creds["Type"] != "AWS-HMAC" || creds["AccessKeyId"] != "ASIAKEY1" ||
		creds["Expiration"] != source.expires.UTC().Format("2006-01-02T15:04:05Z") {
		t.Errorf("the credentials: %s, want Expiration %s, the source's", a.body, source.expires.UTC())
	}
	var info map[string]string
	if a := w.answer(ctx, roleInfoPath); json.Unmarshal([]byte(a.body), &info) != nil || info["InstanceProfileArn"] != "arn:aws:iam::111122223333:role/team/web-role" {
		t.Errorf("iam/info: %d %s", a.status, a.body)
	}
	for _, below := range []string{roleCredentialsDir + "/node-role", roleCredentialsDir + "/web-role/x", "/meta-data/iam/info/x"} {
		if a := w.answer(ctx, below); a.status != http.StatusNotFound {
			t.Errorf("%s: %d, want 404", below, a.status)
		}
	}
	if source.count() != 1 {
		t.Errorf("the source was asked %d times, want once: the credentials are cached", source.count())
	}

	// Due: credentials within roleRefreshBefore of their expiry are served
	// at once and renewed in the background, even from a source that hangs.
	source.set(roleRefreshBefore/2, nil)
	source.delay = 300 * time.Millisecond
	age := func(expiresIn time.Duration) {
		w.mu.Lock()
		w.last.Expiration, w.last.LastUpdated = time.Now().Add(expiresIn), time.Now().Add(-time.Hour)
		w.mu.Unlock()
	}
	age(roleRefreshBefore / 2)
	start := time.Now()
	first := w.credentials(ctx)
	if waited := time.Since(start); first.AccessKeyID != "ASIAKEY1" || waited > 100*time.Millisecond {
		t.Errorf("due credentials: %s after %s, want the last ones at once", first.AccessKeyID, waited)
	}
	eventually(t, func() bool { return w.credentials(ctx).AccessKeyID == "ASIAKEY2" }, "the background renewal's credentials served")
	source.delay = 0

	// Down: the last credentials are served while they are good for
	// roleStillGood, at once; the failure is logged once with its cause; the
	// source is asked once by 5 requests.
	source.set(6*time.Hour, errors.New("dial tcp 169.254.170.2:80: connect: connection refused"))
	age(roleRefreshBefore / 2)
	before := source.count()
	for range 5 {
		if a := w.answer(ctx, roleCredentialsDir+"/web-role"); a.status != http.StatusOK || !strings.Contains(a.body, "ASIAKEY2") {
			t.Errorf("while the source fails, its last credentials good for %s: %d %s, want them served", roleRefreshBefore/2, a.status, a.body)
		}
	}
	eventually(t, func() bool { return testutil.ToFloat64(w.failures) == 1 }, "the background renewal's failure counted")
	if asked := source.count() - before; asked != 1 {
		t.Errorf("the failing source was asked %d times by 5 requests within %s, want once", asked, roleRetryAfter)
	}
	w.mu.Lock()
	w.last.Expiration, w.failedAt = time.Now().Add(roleStillGood-time.Second), time.Now().Add(-roleRetryAfter)
	w.mu.Unlock()
	if a := w.answer(ctx, roleCredentialsDir+"/web-role"); a.status != http.StatusNotFound || a.outcome != outcomeWorkloadRoleUnavailable {
		t.Errorf("while the source fails and its last credentials expire within %s: %d %s, want 404", roleStillGood, a.status, a.outcome)
	}
	if a := w.answer(ctx, roleCredentialsDir); a.status != http.StatusNotFound {
		t.Errorf("the listing then: %d, want 404, as where no role is attached", a.status)
	}
	failed := logs.FilterMessageSnippet("cannot be had").All()
	if len(failed) != 1 || !strings.Contains(fmt.Sprint(failed[0].ContextMap()), "connection refused") {
		t.Errorf("failure log lines: %v, want one naming the cause", failed)
	}
	if testutil.ToFloat64(w.valid) != 0 || testutil.ToFloat64(w.failures) != 2 {
		t.Errorf("valid %v, failures %v; want 0 and 2", testutil.ToFloat64(w.valid), testutil.ToFloat64(w.failures))
	}

	// Back: served again after roleRetryAfter, and said once.
	source.set(6*time.Hour, nil)
	w.mu.Lock()
	w.failedAt = time.Now().Add(-roleRetryAfter)
	w.mu.Unlock()
	if a := w.answer(ctx, roleCredentialsDir+"/web-role"); a.status != http.StatusOK {
		t.Errorf("after the source came back: %d", a.status)
	}
	if n := logs.FilterMessageSnippet("from its source again").Len(); n != 1 || testutil.ToFloat64(w.valid) != 1 {
		t.Errorf("recovery logged %d times, valid %v; want once and 1", n, testutil.ToFloat64(w.valid))
	}
	for _, entry := range logs.All() {
		if strings.Contains(fmt.Sprint(entry.ContextMap()), "secret") || strings.Contains(fmt.Sprint(entry.ContextMap()), "ASIAKEY") {
			t.Errorf("a log line carries credentials: %v", entry.ContextMap())
		}
	}
}

// TestWorkloadRoleCallerGivingUpIsNoOutage: a request whose client has
// gone still gets the source's answer recorded, and its cancellation is
// neither logged nor counted as the source's failure.
func TestWorkloadRoleCallerGivingUpIsNoOutage(t *testing.T) {
	source := &scriptedSource{expiresIn: 6 * time.Hour, delay: 50 * time.Millisecond}
	core, logs := observer.New(zap.InfoLevel)
	w, err := newWorkloadRole(workloadrole.New("", workload.IdentityIRSA, source), zap.New(core), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if c := w.credentials(ctx); c.AccessKeyID != "ASIAKEY1" || testutil.ToFloat64(w.failures) != 0 || logs.Len() != 0 {
		t.Errorf("a gone client's request: %q, failures %v, logs %v; want the credentials and no failure", c.AccessKeyID, testutil.ToFloat64(w.failures), logs.All())
	}
}
