package testutil

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// DockerDefaultCaps is the capability set Docker and containerd give a
// container by default (moby's oci/caps/defaults.go), as setpriv names them.
const DockerDefaultCaps = "chown,dac_override,fowner,fsetid,kill,setgid,setuid,setpcap,net_bind_service,net_raw,sys_chroot,mknod,audit_write,setfcap"

// Cgroups are the cgroup v2 groups of one test: a parent made for it under
// the machine's cgroup2 mount, with one child per container. They are
// removed when the test ends, after the processes in them are killed.
type Cgroups struct {
	parent string
}

// NewCgroups makes the test's parent group. It fails without a writable
// cgroup2 mount (these machines have one, beside the v1 controllers).
func NewCgroups(t testing.TB) *Cgroups {
	t.Helper()
	RequireRoot(t)
	mount := cgroup2Mount(t)
	suffix := make([]byte, 4)
	_, _ = rand.Read(suffix)
	c := &Cgroups{parent: filepath.Join(mount, "imdsp-test-"+hex.EncodeToString(suffix))}
	if err := os.Mkdir(c.parent, 0o755); err != nil {
		t.Fatalf("making a cgroup v2 group: %v", err)
	}
	t.Cleanup(func() { c.remove(t) })
	return c
}

func cgroup2Mount(t testing.TB) string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i, field := range fields {
			if field == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" {
				return fields[4]
			}
		}
	}
	t.Fatal("no cgroup2 mount on this machine: the cgroup exemption tests need one")
	return ""
}

// Container returns cmd (argv) set up to start as a container of the
// runtime starts it: in ns's network namespace, in a cgroup of its own
// named name, with a cgroup namespace rooted there. name may be a path,
// shaped like a runtime's ("kubepods/besteffort/pod<uid>/<container id>"). An app container
// (app true) also gets PID and mount namespaces of its own, cgroupfs
// read-only, and exactly Docker's default capabilities.
func (c *Cgroups) Container(t testing.TB, ns *Netns, name string, app bool, argv ...string) *exec.Cmd {
	t.Helper()
	dir := filepath.Join(c.parent, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("making cgroup %s: %v", name, err)
	}
	group, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { group.Close() })
	// The cgroup namespace is made by unshare once the process is in its
	// group: a namespace made at clone time would be rooted at the parent's.
	wrap := []string{"--net=/run/netns/" + ns.Name, "unshare", "--cgroup"}
	if app {
		wrap = append(wrap, "--pid", "--fork", "--mount-proc", "--propagation", "private", "--",
			"sh", "-c", `mount -o remount,bind,ro "$0" && exec "$@"`, cgroup2Mount(t),
			"setpriv", "--bounding-set", "-all,+"+strings.ReplaceAll(DockerDefaultCaps, ",", ",+"),
			"--inh-caps", "-all", "--")
	} else {
		wrap = append(wrap, "--")
	}
	cmd := exec.Command("nsenter", append(wrap, argv...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(group.Fd())}
	return cmd
}

// ConnectedApp starts an app container named name (a cgroup path, see
// Container) in ns whose process connects to a listener on nodeIP in node
// and holds the connection open, as a workload's SDK holds its connection
// to IMDS. It returns the caller's end of the connection as node sees it,
// and the container's command; both end with the test.
func (c *Cgroups) ConnectedApp(t testing.TB, node, ns *Netns, nodeIP, name string) (netip.AddrPort, *exec.Cmd) {
	t.Helper()
	var ln net.Listener
	var err error
	node.Do(t, func() { ln, err = net.Listen("tcp", net.JoinHostPort(nodeIP, "0")) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	app := c.Container(t, ns, name, true,
		"bash", "-c", "exec 3<>/dev/tcp/"+nodeIP+"/"+strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)+"; exec sleep 60")
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = app.Process.Kill(); _ = app.Wait() })
	_ = ln.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	conn, err := ln.Accept()
	if err != nil {
		t.Fatalf("the container did not connect: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return netip.MustParseAddrPort(conn.RemoteAddr().String()), app
}

// Kill kills every process of container name, as a runtime stops a
// container, and waits until its group is empty.
func (c *Cgroups) Kill(t testing.TB, name string) {
	t.Helper()
	dir := filepath.Join(c.parent, name)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0o644); err != nil {
		t.Fatalf("killing container %s: %v", name, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if err == nil && len(strings.TrimSpace(string(procs))) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("container %s still has processes after 5s: %s", name, procs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// remove kills what is left in the test's groups and removes them, the
// deepest first.
func (c *Cgroups) remove(t testing.TB) {
	_ = os.WriteFile(filepath.Join(c.parent, "cgroup.kill"), []byte("1"), 0o644)
	var dirs []string
	_ = filepath.WalkDir(c.parent, func(path string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		deadline := time.Now().Add(5 * time.Second)
		for os.Remove(dirs[i]) != nil && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if _, err := os.Stat(c.parent); err == nil {
		t.Errorf("removing the test's cgroup %s: still there", c.parent)
	}
}
