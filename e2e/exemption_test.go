package e2e

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// forgeScript is what a hostile root app container tries: it optionally
// takes the exempt UID (keeping NET_RAW, as a root process with CAP_SETUID
// and CAP_SETPCAP can), optionally marks its socket, then sends a tokenless
// GET to IMDS and prints the status line and X-Imds-Proxy header.
const forgeScript = `
import ctypes, os, socket, sys
mark, uid, host = int(sys.argv[1], 0), int(sys.argv[2]), sys.argv[3]
if uid >= 0:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS
    os.setuid(uid)
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    net_raw = 1 << 13
    data = (Data * 2)(Data(net_raw, net_raw, 0), Data(0, 0, 0))
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        sys.exit("capset: errno %d" % ctypes.get_errno())
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
if mark:
    s.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
s.settimeout(3)
try:
    s.connect((host, 80))
    s.sendall(b"GET /latest/meta-data/instance-id HTTP/1.0\r\nHost: imds\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except OSError as e:
    print("unreachable", e)
    sys.exit(0)
head = data.split(b"\r\n\r\n")[0].decode()
proxy = [l for l in head.split("\r\n") if l.lower().startswith("x-imds-proxy:")]
print(head.split("\r\n")[0], *proxy)
`

// TestSidecarExemptionCannotBeForged runs the sidecar as a container is
// run (a cgroup and cgroup namespace of its own) with --v1 block, and root
// app containers (their own cgroup, cgroup, PID and mount namespaces,
// read-only cgroupfs, exactly Docker's default capabilities) in the same
// network namespace. IMDS allows IMDSv1, so a tokenless GET that got past
// the sidecar would be answered 200; through the sidecar it gets 401.
// Forged marks, the UID a --exempt-uid sidecar would exempt, both, and
// IPv6 all meet the sidecar, while the Go SDK in an app gets credentials.
func TestSidecarExemptionCannotBeForged(t *testing.T) {
	e := testutil.NewEC2(t, testutil.HopLimit(2), testutil.IMDSv1Allowed(), testutil.WithIPv6())
	cgroups := testutil.NewCgroups(t)
	sidecar := testutil.StartProcess(t, cgroups.Container(t, e.Task, "sidecar", false, bins.Proxy, "sidecar",
		"--listen", "127.0.0.1:8169", "--metrics-listen", "127.0.0.1:9169", "--upstream", "http://169.254.169.254",
		"--v1", "block", "--iptables-backend", "nft"))
	sidecar.WaitReady(t, e.Task)
	if !strings.Contains(sidecar.Logs.String(), "exempts the proxy's own cgroup") {
		t.Fatalf("the sidecar does not exempt its cgroup:\n%s", sidecar.Logs.String())
	}
	if r, _ := runDoctor(t, e.Task); r.Rules != "present, exempting the proxy's own cgroup" {
		t.Errorf("doctor in the pod: redirect rules %q, want the cgroup exemption named", r.Rules)
	}
	python := pythonExecutable(t)
	attempts := []struct {
		name, mark, uid, host string
	}{
		{"no exemption claimed", "0", "-1", "169.254.169.254"},
		{"the default mark 0x1169", "0x1169", "-1", "169.254.169.254"},
		{"another mark", "0x1", "-1", "169.254.169.254"},
		{"setuid to 1337", "0", "1337", "169.254.169.254"},
		{"setuid to 1337 and the default mark", "0x1169", "1337", "169.254.169.254"},
		{"the default mark over IPv6", "0x1169", "-1", "fd00:ec2::254"},
	}
	for i, a := range attempts {
		cmd := cgroups.Container(t, e.Task, "app"+string(rune('a'+i)), true, python, "-c", forgeScript, a.mark, a.uid, a.host)
		out, err := runBounded(cmd, 20*time.Second)
		if err != nil {
			t.Errorf("%s: %v\n%s", a.name, err, out)
			continue
		}
		if got := strings.TrimSpace(out); !strings.HasPrefix(got, "HTTP/1.0 401") || !strings.Contains(strings.ToLower(got), "x-imds-proxy: sidecar") {
			t.Errorf("%s: %q, want the sidecar's 401 (a bypass reaches IMDS, which answers 200)", a.name, got)
		}
	}
	sdk := cgroups.Container(t, e.Task, "sdk", true, append([]string{"env"}, append(clientEnv(), bins.DemoClient, "--calls", "1", "--json")...)...)
	if out, err := runBounded(sdk, 30*time.Second); err != nil || !strings.Contains(out, "12345678901") {
		t.Errorf("the Go SDK in an app container: %v\n%s", err, out)
	}
	if n := e.TokenlessRequests(t); n != 0 {
		t.Errorf("IMDS saw %d tokenless requests: something got past the sidecar", n)
	}
}

// runBounded runs cmd to its end, within timeout, and returns its output.
func runBounded(cmd *exec.Cmd, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	bounded := exec.CommandContext(ctx, cmd.Path, cmd.Args[1:]...)
	bounded.SysProcAttr, bounded.Env = cmd.SysProcAttr, cmd.Env
	out, err := bounded.CombinedOutput()
	return string(out), err
}

// pythonExecutable is python3's real path (not a pyenv shim, which needs
// HOME and PATH), for running it inside emulated containers.
func pythonExecutable(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("python3", "-c", "import sys; print(sys.executable)").Output()
	if err != nil {
		testutil.SkipOutsideCI(t, "python3 is not installed")
	}
	return strings.TrimSpace(string(out))
}
