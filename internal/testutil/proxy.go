package testutil

import (
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// ProxyOption changes how StartProxy runs imds-proxy.
type ProxyOption func(*proxyStart)

type proxyStart struct {
	env          []string
	wrapper      []string
	untilServing bool
}

// WithEnv adds variables to the proxy's environment, which otherwise holds
// only PATH: no IMDS_PROXY_ setting of the caller's leaks into its flags.
func WithEnv(env ...string) ProxyOption {
	return func(s *proxyStart) { s.env = append(s.env, env...) }
}

// Wrapped runs the proxy under a command that ends by executing it
// (setpriv with its arguments, say): argv goes before the binary.
func Wrapped(argv ...string) ProxyOption {
	return func(s *proxyStart) { s.wrapper = append(s.wrapper, argv...) }
}

// UntilServing returns as soon as the proxy logs that it serves, without
// waiting for /readyz: for a proxy that must not become ready, or whose log
// the test reads before it is ready.
func UntilServing() ProxyOption {
	return func(s *proxyStart) { s.untilServing = true }
}

// StartProxy runs binary (an imds-proxy) with args, inside ns when it is
// not nil, kills it when the test ends, and returns once it serves and its
// /readyz, asked from where its clients are, answers 200.
func StartProxy(t testing.TB, ns *Netns, binary string, args []string, opts ...ProxyOption) *Process {
	t.Helper()
	var s proxyStart
	for _, opt := range opts {
		opt(&s)
	}
	argv := append(append(append([]string(nil), s.wrapper...), binary), args...)
	cmd := commandIn(ns, argv...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, s.env...)
	p := StartProcess(t, cmd)
	if !s.untilServing {
		p.WaitReady(t, ns)
	}
	return p
}

// LoopbackSidecar is the command line of a sidecar without rules, serving
// and answering /readyz on free loopback ports, followed by args.
func LoopbackSidecar(args ...string) []string {
	return append([]string{"sidecar", "--rules=false", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"}, args...)
}

// WaitReady waits until the proxy's /readyz, asked from inside ns (from
// this process when ns is nil), answers 200; a proxy that exits or stays
// unready fails the test.
func (p *Process) WaitReady(t testing.TB, ns *Netns) {
	t.Helper()
	addr := strings.TrimPrefix(p.Metrics, "http://")
	ready := func() bool { return readyzOK(t, ns, addr) }
	if err := waitUntil(ready, readyTimeout, p.exited, addr+"/readyz not ready"); err != nil {
		t.Fatalf("imds-proxy: %v\n%s", err, p.Logs.String())
	}
}

// WaitReady waits for GET addr/readyz from inside the namespace to answer 200.
func (n *Netns) WaitReady(t testing.TB, addr string) {
	t.Helper()
	if err := waitUntil(func() bool { return readyzOK(t, n, addr) }, readyTimeout, nil, addr+"/readyz not ready"); err != nil {
		t.Fatalf("%s: %v", n, err)
	}
}

// readyTimeout bounds a wait for /readyz, which passes once the proxy's
// upstream session is decided and its rules deliver.
const readyTimeout = 20 * time.Second

func readyzOK(t testing.TB, ns *Netns, addr string) bool {
	t.Helper()
	if ns != nil {
		status, _ := ns.Get(t, addr, "/readyz", nil)
		return status == http.StatusOK
	}
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{Proxy: nil}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + addr + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
