package proxy

import (
	"container/list"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
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
	Process
	Count        uint64    `json:"count"`
	FirstSeen    time.Time `json:"first_seen"`
	LastSeen     time.Time `json:"last_seen"`
	ExamplePaths []string  `json:"example_paths"`
}

type callerKey struct{ caller, userAgent, executable string }

// v1Callers is a fixed-size table of IMDSv1 callers; when full, the caller
// seen least recently is evicted.
type v1Callers struct {
	max     int
	evicted func()

	mu      sync.Mutex
	order   *list.List // of *V1Caller, most recently seen first
	entries map[callerKey]*list.Element
	// latest is the entry a caller and User-Agent were last attributed to,
	// for the requests that go unattributed (over the attribution rate).
	latest map[[2]string]callerKey
}

func newV1Callers(max int, evicted func()) *v1Callers {
	return &v1Callers{max: max, evicted: evicted, order: list.New(), entries: map[callerKey]*list.Element{},
		latest: map[[2]string]callerKey{}}
}

// recordUnattributed counts a request whose process was not looked up
// against the entry its caller and User-Agent last had, if any.
func (c *v1Callers) recordUnattributed(caller, userAgent, path string, now time.Time) {
	c.mu.Lock()
	key, ok := c.latest[[2]string{caller, truncate(userAgent)}]
	var proc Process
	if el, found := c.entries[key]; ok && found {
		proc = el.Value.(*V1Caller).Process
	}
	c.mu.Unlock()
	c.record(caller, userAgent, path, proc, now)
}

func (c *v1Callers) record(caller, userAgent, path string, proc Process, now time.Time) {
	key := callerKey{caller, truncate(userAgent), proc.Executable}
	path = truncate(path)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.latest[[2]string{key.caller, key.userAgent}] = key
	if el, ok := c.entries[key]; ok {
		e := el.Value.(*V1Caller)
		e.Count++
		e.LastSeen = now
		e.Process = proc // the latest process behind this caller
		if len(e.ExamplePaths) < maxExamplePaths && !slices.Contains(e.ExamplePaths, path) {
			e.ExamplePaths = append(e.ExamplePaths, path)
		}
		c.order.MoveToFront(el)
		return
	}
	if c.order.Len() >= c.max {
		oldest := c.order.Back()
		o := oldest.Value.(*V1Caller)
		delete(c.entries, callerKey{o.Caller, o.UserAgent, o.Executable})
		if c.latest[[2]string{o.Caller, o.UserAgent}] == (callerKey{o.Caller, o.UserAgent, o.Executable}) {
			delete(c.latest, [2]string{o.Caller, o.UserAgent})
		}
		c.order.Remove(oldest)
		c.evicted()
	}
	e := &V1Caller{Caller: caller, UserAgent: key.userAgent, SDK: sdkFamily(userAgent), Process: proc, Count: 1,
		FirstSeen: now, LastSeen: now, ExamplePaths: []string{path}}
	c.entries[key] = c.order.PushFront(e)
}

// ServeHTTP writes the table as JSON, most recently seen first.
func (c *v1Callers) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	c.mu.Lock()
	out := make([]V1Caller, 0, c.order.Len())
	for el := c.order.Front(); el != nil; el = el.Next() {
		e := *el.Value.(*V1Caller)
		e.ExamplePaths = append([]string(nil), e.ExamplePaths...)
		out = append(out, e)
	}
	c.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
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

// sdkFamily names the client behind a User-Agent from a fixed list.
func sdkFamily(userAgent string) string {
	ua := strings.ToLower(userAgent)
	if ua == "" {
		return "none"
	}
	for _, f := range sdkFamilies {
		if strings.HasPrefix(ua, f.prefix) {
			return f.family
		}
	}
	return "other"
}

func truncate(s string) string {
	if len(s) > maxFieldLen {
		return s[:maxFieldLen]
	}
	return s
}
