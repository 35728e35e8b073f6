package proxy

import (
	"container/list"
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/workload"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// Bounds that keep hostile traffic from growing the IMDSv1 caller table.
const (
	maxFieldLen     = 256
	maxExamplePaths = 5
)

// V1Caller is one distinct IMDSv1 caller, as /v1-callers reports it.
type V1Caller struct {
	Caller    string `json:"caller"`
	UserAgent string `json:"user_agent"`
	SDK       string `json:"sdk"`
	attribution.Process
	// Workload is the caller's workload, where a node agent knows it.
	workload.Workload
	Count uint64 `json:"count"`
	// Blocked are the calls of Count that its policy refused; the others
	// are the ones --v1 block would refuse.
	Blocked uint64 `json:"blocked"`
	// Policy is the IMDSv1 policy its latest call met.
	Policy       imdsapi.V1Policy `json:"v1_policy"`
	FirstSeen    time.Time        `json:"first_seen"`
	LastSeen     time.Time        `json:"last_seen"`
	ExamplePaths []string         `json:"example_paths"`
}

// callerKey is one row of the table.
type callerKey struct {
	caller, userAgent, executable string
	uid                           int // -1: not seen
	cgroup                        string
	workload                      string // namespace/workload/container, where known
}

// quotaKey is whom a row counts against: an address and, within it, the
// socket's UID and the process's cgroup where attribution saw them. A
// caller cannot change these without privileges, unlike its User-Agent or
// executable (a copy of curl under another name), so a flood of made-up
// rows is held to its own quota. In a sidecar every caller shares one
// address (the pod's, or 127.0.0.1 for direct connections), and the UID
// and cgroup (one per container) are what tell the apps apart; a node
// agent sees no process, and the address is the pod.
type quotaKey struct {
	caller string
	uid    int
	cgroup string
}

// Reasons for an eviction, the values of the "reason" label.
const (
	evictedQuota = "quota" // the caller's own oldest row made room for its new one
	evictedFull  = "full"  // the table was full: the oldest row of the caller holding the most went
)

// quotaShare is the fraction of the table one caller may hold: like
// connections, it takes sixteen callers at their quota to fill it.
const quotaShare = 16

type callerRow struct {
	V1Caller
	key   callerKey
	quota quotaKey
	own   *list.Element // in held[quota]
}

// v1Callers is a fixed-size table of IMDSv1 callers. Each caller (see
// quotaKey) holds at most quota rows; a caller past its quota replaces its
// own least recently seen row, and when the table is full a new row
// replaces the least recently seen row of the caller holding the most.
// So a flood of distinct User-Agents from one caller never evicts another
// caller's rows while that caller holds fewer.
type v1Callers struct {
	max, quota int
	evicted    func(reason string)

	mu      sync.Mutex
	order   *list.List // of *callerRow, most recently seen first
	entries map[callerKey]*list.Element
	held    map[quotaKey]*list.List // each caller's elements of order, most recently seen first
	// latest is the row a caller and User-Agent were last attributed to,
	// for the requests that go unattributed (over the attribution rate).
	latest map[[2]string]callerKey
}

func newV1Callers(size int, evicted func(reason string)) *v1Callers {
	quota := min(size, max(size/quotaShare, 4))
	return &v1Callers{max: size, quota: quota, evicted: evicted, order: list.New(), entries: map[callerKey]*list.Element{},
		held: map[quotaKey]*list.List{}, latest: map[[2]string]callerKey{}}
}

// recordUnattributed counts a request whose process was not looked up
// against the row its caller and User-Agent last had, if any, and returns
// that row's process.
func (c *v1Callers) recordUnattributed(caller, userAgent, path string, w workload.Workload, policy imdsapi.V1Policy, now time.Time) attribution.Process {
	c.mu.Lock()
	key, ok := c.latest[[2]string{caller, truncate(userAgent)}]
	var proc attribution.Process
	if el, found := c.entries[key]; ok && found {
		proc = el.Value.(*callerRow).Process
	}
	c.mu.Unlock()
	c.record(caller, userAgent, path, proc, w, policy, now)
	return proc
}

func (c *v1Callers) record(caller, userAgent, path string, proc attribution.Process, w workload.Workload, policy imdsapi.V1Policy, now time.Time) {
	key := callerKey{caller, truncate(userAgent), proc.Executable, uidOf(proc), proc.Cgroup, w.Namespace + "/" + w.Name + "/" + w.Container}
	path = truncate(path)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.latest[[2]string{key.caller, key.userAgent}] = key
	if el, ok := c.entries[key]; ok {
		e := el.Value.(*callerRow)
		e.Count++
		if policy == imdsapi.V1Block {
			e.Blocked++
		}
		e.Policy = policy
		e.LastSeen = now
		e.Process = proc // the latest process behind this caller
		if len(e.ExamplePaths) < maxExamplePaths && !slices.Contains(e.ExamplePaths, path) {
			e.ExamplePaths = append(e.ExamplePaths, path)
		}
		c.order.MoveToFront(el)
		c.held[e.quota].MoveToFront(e.own)
		return
	}
	quota := quotaKey{caller, key.uid, key.cgroup}
	mine := c.held[quota]
	switch {
	case mine != nil && mine.Len() >= c.quota:
		c.evict(mine.Back().Value.(*list.Element), evictedQuota)
	case c.order.Len() >= c.max:
		c.evict(c.greediest().Back().Value.(*list.Element), evictedFull)
	}
	if mine = c.held[quota]; mine == nil {
		mine = list.New()
		c.held[quota] = mine
	}
	e := &callerRow{V1Caller: V1Caller{Caller: caller, UserAgent: key.userAgent, SDK: sdkFamily(userAgent), Process: proc, Workload: w,
		Count: 1, Policy: policy, FirstSeen: now, LastSeen: now, ExamplePaths: []string{path}}, key: key, quota: quota}
	if policy == imdsapi.V1Block {
		e.Blocked = 1
	}
	el := c.order.PushFront(e)
	e.own = mine.PushFront(el)
	c.entries[key] = el
}

// greediest is the row list of the caller holding the most rows; of
// callers holding as many, the one whose oldest row was seen longest ago.
func (c *v1Callers) greediest() *list.List {
	var most *list.List
	for _, l := range c.held {
		switch {
		case most == nil, l.Len() > most.Len():
			most = l
		case l.Len() == most.Len():
			oldest := func(l *list.List) time.Time { return l.Back().Value.(*list.Element).Value.(*callerRow).LastSeen }
			if oldest(l).Before(oldest(most)) {
				most = l
			}
		}
	}
	return most
}

// evict removes the row at el and counts it.
func (c *v1Callers) evict(el *list.Element, reason string) {
	o := el.Value.(*callerRow)
	delete(c.entries, o.key)
	if c.latest[[2]string{o.key.caller, o.key.userAgent}] == o.key {
		delete(c.latest, [2]string{o.key.caller, o.key.userAgent})
	}
	mine := c.held[o.quota]
	mine.Remove(o.own)
	if mine.Len() == 0 {
		delete(c.held, o.quota)
	}
	c.order.Remove(el)
	c.evicted(reason)
}

// ServeHTTP writes the table as JSON, most recently seen first.
func (c *v1Callers) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(c.snapshot())
}

// snapshot copies the table, most recently seen first.
func (c *v1Callers) snapshot() []V1Caller {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]V1Caller, 0, c.order.Len())
	for el := c.order.Front(); el != nil; el = el.Next() {
		e := el.Value.(*callerRow).V1Caller
		e.ExamplePaths = append([]string(nil), e.ExamplePaths...)
		out = append(out, e)
	}
	return out
}

// sdkFamilies maps User-Agent prefixes to a bounded set of label values.
var sdkFamilies = []struct{ prefix, family string }{
	{"aws-sdk-go-v2/", "go-v2"},
	{"aws-sdk-go/", "go-v1"},
	{"aws-cli/", "aws-cli"},
	{"botocore/", "botocore"},
	{"boto3/", "boto3"},
	{"aws-sdk-java/", "java"},
	{"aws-sdk-js/", "js"},
	{"aws-sdk-nodejs/", "js"},
	{"aws-sdk-dotnet", "dotnet"},
	{"aws-sdk-ruby", "ruby"},
	{"aws-sdk-php/", "php"},
	{"aws-sdk-rust/", "rust"},
	{"aws-sdk-cpp/", "cpp"},
	{"curl/", "curl"},
	{"wget/", "wget"},
}

// sdkFamily names the client behind a User-Agent from a fixed list. A
// request without one is "unknown": the AWS SDK for JavaScript v3 sends
// none, and a tokenless request carries no token TTL that could tell it
// from any other client without one.
func sdkFamily(userAgent string) string {
	ua := strings.ToLower(userAgent)
	if ua == "" {
		return "unknown"
	}
	for _, f := range sdkFamilies {
		if strings.HasPrefix(ua, f.prefix) {
			return f.family
		}
	}
	return "other"
}

// truncate bounds a client-supplied string for the table and the log.
func truncate(s string) string { return truncateN(s, maxFieldLen) }

// truncateN cuts s to at most n bytes at a UTF-8 boundary. The cut is a
// copy: a slice would keep the whole request header alive as long as the
// table or the log limiter holds it.
func truncateN(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return strings.Clone(s[:n])
}

// uidOf is the socket UID attribution found, or -1.
func uidOf(p attribution.Process) int {
	if p.UID == nil {
		return -1
	}
	return *p.UID
}

// Kinds of log line the log limit counts apart.
const (
	logKindV1              = "v1"
	logKindPathDenied      = "path_denied"
	logKindIdentityGuarded = "identity_guarded"
	logKindBadSetting      = "bad_setting"
)

// logSummaries is the summary line of each kind.
var logSummaries = map[string]string{
	logKindV1:              "IMDSv1 requests (no token) not logged one by one",
	logKindPathDenied:      "requests denied by the path policy not logged one by one",
	logKindIdentityGuarded: "refusals of the node role's credentials not logged one by one",
	logKindBadSetting:      "requests of a workload whose IMDSv1 setting is no policy not logged one by one",
}

// logKey is one caller's share of the log limit, for one kind of line.
type logKey struct {
	kind, caller string
	uid          int // -1: not seen
}

// logTally is what one caller's requests cost the log in the current window.
type logTally struct {
	logged                  int
	suppressed              uint64
	lastPath, lastUserAgent string
}

// Bounds of the log limit.
const (
	// logBurst lines per caller and window are written one by one.
	logBurst = 5
	// logCallers bounds the callers tallied in one window; past it, callers
	// share one tally per kind, whose summary names no caller.
	logCallers = 256
	// logPerSecond bounds the lines of all callers together, so that many
	// callers at once cannot amplify either.
	logPerSecond = 20
)

// logLimiter keeps requests from flooding the log: each caller's first
// logBurst lines in a window are written, the rest are counted, and one
// summary line per caller with a count (its last path and User-Agent,
// truncated) follows when the window ends.
type logLimiter struct {
	interval time.Duration
	global   *rate.Limiter

	mu      sync.Mutex
	tallies map[logKey]*logTally
}

func newLogLimiter(interval time.Duration) *logLimiter {
	return &logLimiter{interval: interval, global: rate.NewLimiter(logPerSecond, logPerSecond), tallies: map[logKey]*logTally{}}
}

// allow says whether the line for a request of key may be written, and
// counts it for the summary when not.
func (l *logLimiter) allow(key logKey, path, userAgent string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	t := l.tallies[key]
	if t == nil {
		if len(l.tallies) >= logCallers {
			key = logKey{kind: key.kind, caller: "(more callers)", uid: -1}
		}
		if t = l.tallies[key]; t == nil {
			t = &logTally{}
			l.tallies[key] = t
		}
	}
	if t.logged < logBurst && l.global.Allow() {
		t.logged++
		return true
	}
	t.suppressed++
	t.lastPath, t.lastUserAgent = truncate(path), truncate(userAgent)
	return false
}

// run writes the summaries at the end of every window until ctx ends, and
// those of the last window then.
func (l *logLimiter) run(ctx context.Context, log *zap.Logger) {
	tick := time.NewTicker(l.interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			l.flush(log)
			return
		case <-tick.C:
			l.flush(log)
		}
	}
}

// flush ends the window: it writes one summary per caller whose lines were
// held back, and starts every caller afresh.
func (l *logLimiter) flush(log *zap.Logger) {
	l.mu.Lock()
	tallies := l.tallies
	l.tallies = make(map[logKey]*logTally, len(tallies))
	l.mu.Unlock()
	for key, t := range tallies {
		if t.suppressed == 0 {
			continue
		}
		msg := logSummaries[key.kind]
		uid := &key.uid
		if key.uid < 0 {
			uid = nil
		}
		log.Warn(msg, zap.String("caller", key.caller), zap.Intp("uid", uid), zap.Uint64("count", t.suppressed),
			zap.String("last_path", t.lastPath), zap.String("last_user_agent", t.lastUserAgent),
			zap.Duration("window", l.interval))
	}
}
