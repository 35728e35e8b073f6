package testutil

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// RequireRoot skips a test that needs root and network namespaces, except in
// CI (CI=true), where such tests must run and their absence is a failure.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		if _, err := exec.LookPath("ip"); err != nil {
			t.Fatalf("the ip command (iproute2) is missing: %v", err)
		}
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root and network namespaces, and CI must run it: run make test as root")
	}
	t.Skip("needs root for network namespaces (runs in CI)")
}

// SkipOutsideCI skips a test for a reason that only a machine other than
// CI may have (a missing tool CI installs); under CI=true it fails instead.
func SkipOutsideCI(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s, and CI must run this test", reason)
	}
	t.Skip(reason)
}

// Netns is a network namespace made by a test and deleted when it ends.
type Netns struct{ Name string }

// NewNetns creates a namespace with its loopback up.
func NewNetns(t testing.TB) *Netns {
	t.Helper()
	RequireRoot(t)
	suffix := make([]byte, 4)
	_, _ = rand.Read(suffix)
	n := &Netns{Name: "imdsp-test-" + hex.EncodeToString(suffix)}
	run(t, "ip", "netns", "add", n.Name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", n.Name).Run() })
	n.Run(t, "ip", "link", "set", "lo", "up")
	return n
}

// Run runs a command inside the namespace and returns its output; failure
// fails the test.
func (n *Netns) Run(t testing.TB, args ...string) string {
	t.Helper()
	return run(t, append([]string{"ip", "netns", "exec", n.Name}, args...)...)
}

// Command returns a command that will run inside the namespace.
func (n *Netns) Command(args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// commandIn returns a command that will run argv inside ns, or in this
// process's namespace when ns is nil.
func commandIn(ns *Netns, argv ...string) *exec.Cmd {
	if ns == nil {
		return exec.Command(argv[0], argv[1:]...)
	}
	return ns.Command(argv...)
}

// Do runs fn with the calling goroutine's thread inside the namespace, so
// that processes fn starts (such as iptables) run there too.
func (n *Netns) Do(t testing.TB, fn func()) {
	t.Helper()
	if err := n.Enter(fn); err != nil {
		t.Fatal(err)
	}
}

// Enter is Do for a goroutine that is not the test's: it answers an error
// rather than failing the test.
func (n *Netns) Enter(fn func()) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := os.Open("/var/run/netns/" + n.Name)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering %s: %w", n.Name, err)
	}
	defer func() {
		// A thread that cannot return stays locked, so Go discards it.
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err == nil {
			runtime.UnlockOSThread()
		}
	}()
	fn()
	return nil
}

// IptablesSave returns `<cmd>-save` of the namespace with counters zeroed and
// comment lines (which hold timestamps) dropped: what must be identical
// before install and after remove.
func (n *Netns) IptablesSave(t testing.TB, saveCmd string) string {
	t.Helper()
	var lines []string
	for _, line := range strings.Split(n.Run(t, saveCmd), "\n") {
		if strings.HasPrefix(line, "#") || line == "" {
			continue
		}
		if strings.HasPrefix(line, ":") {
			if i := strings.LastIndex(line, " ["); i > 0 {
				line = line[:i] + " [0:0]"
			}
		}
		lines = append(lines, line)
	}
	return strings.Join(lines, "\n") + "\n"
}

func run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// String names the namespace.
func (n *Netns) String() string { return fmt.Sprintf("netns %s", n.Name) }

// Get sends one GET from inside the namespace and returns the status and
// body. It dials on the calling thread itself (net/http's transport would
// dial from another thread, outside the namespace).
func (n *Netns) Get(t testing.TB, addr, path string, header http.Header) (int, string) {
	t.Helper()
	return n.Send(t, http.MethodGet, addr, path, header)
}

// Send is Get with another method: an IMDSv2 token's PUT, say.
func (n *Netns) Send(t testing.TB, method, addr, path string, header http.Header) (int, string) {
	t.Helper()
	var status int
	var body []byte
	n.Do(t, func() {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("%s: dial %s: %v", n, addr, err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		req, _ := http.NewRequest(method, "http://"+addr+path, nil)
		for k, v := range header {
			req.Header[k] = v
		}
		req.Close = true
		if err := req.Write(c); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), req)
		if err != nil {
			t.Fatalf("%s: %s %s%s: %v", n, method, addr, path, err)
		}
		defer resp.Body.Close()
		status = resp.StatusCode
		body, _ = io.ReadAll(resp.Body)
	})
	return status, string(body)
}

// TryDial opens a TCP connection to addr from inside the namespace, with a
// one-second timeout, closes it, and returns the error if it could not.
func (n *Netns) TryDial(t testing.TB, addr string) (err error) {
	t.Helper()
	n.Do(t, func() {
		var c net.Conn
		if c, err = net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
		}
	})
	return err
}

// Veth connects namespaces a and b with a veth pair named aName (in a) and
// bName (in b), both up, with the given addresses (CIDR).
func Veth(t testing.TB, a *Netns, aName, aAddr string, b *Netns, bName, bAddr string) {
	t.Helper()
	a.Run(t, "ip", "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.Name)
	a.Run(t, "ip", "addr", "add", aAddr, "dev", aName)
	b.Run(t, "ip", "addr", "add", bAddr, "dev", bName)
	a.Run(t, "ip", "link", "set", aName, "up")
	b.Run(t, "ip", "link", "set", bName, "up")
}
