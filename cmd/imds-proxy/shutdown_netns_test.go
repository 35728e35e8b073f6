package main

import (
	"errors"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// shutdownMode is a proxy in a namespace whose only NAT rules are its own
// (iptables-nft), as in a pod's or an awsvpc task's namespace, or on a
// node where nothing else NATs, and the namespace its clients dial IMDS from.
type shutdownMode struct {
	name              string
	rulesNS, clientNS *testutil.Netns
	args              []string
}

var shutdownModes = []struct {
	name string
	make func(t *testing.T) shutdownMode
}{
	{"sidecar", func(t *testing.T) shutdownMode {
		e := newSidecarEC2(t)
		return shutdownMode{"sidecar", e.Task, e.Task, sidecarArgs("--iptables-backend", "nft")}
	}},
	{"node", func(t *testing.T) shutdownMode {
		e := testutil.NewEC2(t, testutil.WithVPC())
		return shutdownMode{"node", e.Node, e.Task, nodeArgs("--interfaces", "cveth+", "--iptables-backend", "nft")}
	}},
}

// TestSIGTERMClosesKeepAliveConnectionsCleanly: a client's idle keep-alive
// connection, redirected to the proxy, sees a clean close (EOF) on SIGTERM,
// not a close that NAT no longer translates (which leaves the client's
// socket open and resets its next request). Afterwards the rules are gone,
// so IMDS answers clients directly (fail open); with --keep-rules-on-exit
// they stay, and new IMDS connections are refused (fail closed).
func TestSIGTERMClosesKeepAliveConnectionsCleanly(t *testing.T) {
	for _, mode := range shutdownModes {
		for _, keep := range []bool{false, true} {
			name := mode.name + map[bool]string{false: "/remove rules", true: "/keep rules"}[keep]
			t.Run(name, func(t *testing.T) { checkCleanClose(t, mode.make(t), keep) })
		}
	}
}

func checkCleanClose(t *testing.T, s shutdownMode, keep bool) {
	t.Helper()
	const imds = "169.254.169.254:80"
	args := s.args
	if keep {
		args = append(append([]string(nil), args...), "--keep-rules-on-exit")
	}
	proxy := testutil.StartProxy(t, s.rulesNS, binary, args)
	saved := s.rulesNS.Run(t, "iptables-nft-save", "-t", "nat")
	if strings.Count(saved, "\n-A ") != strings.Count(saved, "imds-proxy: ") {
		t.Fatalf("the namespace has NAT rules besides the proxy's:\n%s", saved)
	}
	c := dialIn(t, s.clientNS, imds)
	if status := getOn(t, c, "/latest/meta-data/instance-id"); status != 200 {
		t.Fatalf("keep-alive GET through the redirect: %d, want 200\n%s", status, proxy.Logs.String())
	}

	sent := time.Now()
	if err := proxy.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	closed := time.Since(sent)
	if n != 0 || !errors.Is(err, io.EOF) {
		t.Errorf("the idle keep-alive connection after SIGTERM: read %d bytes, %v; want a clean close (EOF)\nnft ruleset:\n%s",
			n, err, s.rulesNS.Run(t, "nft", "list", "ruleset"))
	}
	if !keep {
		// The listener is closed before the rules go: new IMDS connections
		// meanwhile are refused (clients retry), then reach IMDS directly.
		refusedFor := time.Duration(0)
		for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(time.Millisecond) {
			if s.clientNS.TryDial(t, imds) == nil {
				refusedFor = time.Since(start)
				break
			}
		}
		t.Logf("%s: new IMDS connections refused for %s after the clean close, then straight to IMDS", s.name, refusedFor.Round(time.Millisecond))
		if refusedFor == 0 || refusedFor > 2*time.Second {
			t.Errorf("new IMDS connections were refused for %s after SIGTERM (0: never reached IMDS)", refusedFor)
		}
	}
	if err := proxy.WaitExit(t, 10*time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, proxy.Logs.String())
	}
	exited := time.Since(sent)
	t.Logf("%s: SIGTERM to client EOF %s, to exit %s", s.name, closed.Round(10*time.Microsecond), exited.Round(10*time.Microsecond))

	left := saveRules(t, s.rulesNS)
	switch {
	case keep && !strings.Contains(left, "IMDS_PROXY"):
		t.Errorf("--keep-rules-on-exit: the rules are gone:\n%s", left)
	case keep:
		// Fail closed: IMDS connections still go to the (absent) proxy.
		if err := s.clientNS.TryDial(t, imds); err == nil {
			t.Error("--keep-rules-on-exit: a new IMDS connection was accepted with the proxy gone")
		}
	case strings.Contains(left, "IMDS_PROXY"):
		t.Errorf("rules left after SIGTERM:\n%s", left)
	default:
		// Fail open: IMDS itself answers (401: it requires tokens).
		if status, _ := s.clientNS.Get(t, imds, "/latest/meta-data/instance-id", nil); status != 401 {
			t.Errorf("with the rules removed, a tokenless GET got %d, want IMDS's own 401", status)
		}
	}
}

// TestSIGKILLLeavesRulesTheSuccessorAdopts: a killed proxy cannot remove its
// rules; the next one adopts them, serves through them, and removes them on
// SIGTERM.
func TestSIGKILLLeavesRulesTheSuccessorAdopts(t *testing.T) {
	e := newSidecarEC2(t)
	args := sidecarArgs("--iptables-backend", "nft")
	first := testutil.StartProxy(t, e.Task, binary, args)
	installed := saveRules(t, e.Task)
	if err := first.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-first.Done
	if left := saveRules(t, e.Task); left != installed {
		t.Fatalf("after SIGKILL the rules changed:\nwas:\n%s\nnow:\n%s", installed, left)
	}
	second := testutil.StartProxy(t, e.Task, binary, args)
	if adopted := saveRules(t, e.Task); adopted != installed {
		t.Errorf("the successor's rules differ from its predecessor's (duplicates?):\nwas:\n%s\nnow:\n%s", installed, adopted)
	}
	if status, body := e.Task.Get(t, "169.254.169.254:80", "/latest/meta-data/instance-id", nil); status != 200 || body != "i-1234567890abcdef0" {
		t.Errorf("tokenless GET through the adopted rules: %d %q, want 200", status, body)
	}
	second.Terminate(t)
	if after := saveRules(t, e.Task); strings.Contains(after, "IMDS_PROXY") {
		t.Errorf("rules left after the successor's SIGTERM:\n%s", after)
	}
}
