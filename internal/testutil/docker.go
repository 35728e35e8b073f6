package testutil

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Docker is a real Docker engine (Debian's docker.io: dockerd 20.10,
// containerd, runc) whose networking lives in a node namespace the test made:
// docker0, user-defined bridges (br-*), veths and Docker's iptables rules are
// all there, never in the root namespace. Containers get Docker's default
// capabilities; images come from BuildImage or BuildBotocoreImage, since no
// registry is reachable (every run uses --pull never).
type Docker struct {
	Node *Netns
	// Socket is dockerd's API socket: docker --host unix://<Socket>.
	Socket  string
	dir     string
	cli     string
	daemons []*dockerDaemon
	cgroup  string
}

type dockerDaemon struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// Host paths dockerd and containerd create whatever their flags say; StartDocker
// removes those it created (directories only while empty, since another engine
// may be using them).
var dockerHostPaths = []string{"/etc/docker/key.json", "/run/docker", "/run/containerd"}

// engineLock is the file whose lock one test process holds while its Docker
// engine runs: go test runs packages in parallel, and two engines share
// host paths (/etc/docker/key.json, /run/docker, /run/containerd/s) that
// each removes when it stops.
const engineLock = "/tmp/imds-proxy-test-docker.lock"

// lockEngines waits for the engine lock and holds it until the test ends
// (registered first, so it is released after the engine has stopped).
func lockEngines(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile(engineLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("opening %s: %v", engineLock, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		t.Fatalf("locking %s: %v", engineLock, err)
	}
	t.Cleanup(func() { f.Close() }) // closing releases the lock
}

// StartDocker starts containerd and dockerd inside node (with nsenter --net,
// so both see the real /sys) with private paths under t.TempDir(), checks that
// both run in node's network namespace and that the root namespace has no
// docker0, br-*, Docker veth or DOCKER chain, and waits for the API. At
// cleanup it removes the containers, stops the daemons by the PIDs it started,
// removes what they left (mounts, shims, cgroups, /etc/docker/key.json,
// /run/docker) and checks the root namespace again. It skips without root,
// and without the binaries (make deps installs them), unless CI=true, where
// both fail the test.
func StartDocker(t testing.TB, node *Netns) *Docker {
	t.Helper()
	RequireRoot(t)
	bins := map[string]string{}
	for _, name := range []string{"dockerd", "containerd", "containerd-shim-runc-v2", "runc", "docker-init", "iptables", "nsenter"} {
		p, err := exec.LookPath(name)
		if err != nil {
			for _, dir := range []string{"/usr/sbin", "/usr/bin", "/sbin"} {
				if _, err2 := os.Stat(filepath.Join(dir, name)); err2 == nil {
					p, err = filepath.Join(dir, name), nil
					break
				}
			}
		}
		if err != nil {
			SkipOutsideCI(t, fmt.Sprintf("%s is missing (make deps installs docker.io)", name))
		}
		bins[name] = p
	}
	lockEngines(t)
	d := &Docker{Node: node, cli: dockerCLI(t), cgroup: node.Name + "-docker"}
	d.dir = t.TempDir()
	if len(d.dir) > 64 { // unix socket paths must stay under 108 bytes
		dir, err := os.MkdirTemp("", "imdsp-docker-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(dir) })
		d.dir = dir
	}
	d.Socket = filepath.Join(d.dir, "docker.sock")
	for _, sub := range []string{"containerd", "data", "exec", "cli"} {
		if err := os.MkdirAll(filepath.Join(d.dir, sub), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ctrdSock := filepath.Join(d.dir, "containerd.sock")
	config := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, filepath.Join(d.dir, "containerd", "root"), filepath.Join(d.dir, "containerd", "state"), ctrdSock,
		ctrdSock+".ttrpc", filepath.Join(d.dir, "containerd", "opt"))
	daemonJSON := filepath.Join(d.dir, "daemon.json")
	for file, content := range map[string]string{filepath.Join(d.dir, "containerd.toml"): config, daemonJSON: "{}\n"} {
		if err := os.WriteFile(file, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	var created []string
	for _, p := range dockerHostPaths {
		if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			created = append(created, p)
		}
	}
	// Cleanups run last-registered first: this one runs before t.TempDir's.
	t.Cleanup(func() { d.stop(t, created) })

	d.start(t, "containerd", bins["nsenter"], bins["containerd"], "--config", filepath.Join(d.dir, "containerd.toml"))
	if err := waitDial(ctrdSock, 20*time.Second, d.daemons[0].done); err != nil {
		t.Fatalf("containerd did not start: %v\n%s", err, d.logTail())
	}
	if err := d.checkIsolation(); err != nil {
		t.Fatalf("aborting: %v", err)
	}
	d.start(t, "dockerd", bins["nsenter"], bins["dockerd"],
		"--host", "unix://"+d.Socket, "--config-file", daemonJSON,
		"--data-root", filepath.Join(d.dir, "data"), "--exec-root", filepath.Join(d.dir, "exec"),
		"--pidfile", filepath.Join(d.dir, "docker.pid"), "--containerd", ctrdSock,
		"--storage-driver", "overlay2", "--exec-opt", "native.cgroupdriver=cgroupfs",
		"--cgroup-parent", "/"+d.cgroup, "--shutdown-timeout", "3")
	if err := d.waitPing(30*time.Second, d.daemons[1].done); err != nil {
		t.Fatalf("dockerd did not start: %v\n%s", err, d.logTail())
	}
	if err := d.checkIsolation(); err != nil {
		t.Fatalf("aborting: %v", err)
	}
	return d
}

// dockerCLI prefers the CLI docker.io installs next to dockerd (same version),
// then any docker on PATH.
func dockerCLI(t testing.TB) string {
	t.Helper()
	if _, err := os.Stat("/usr/bin/docker"); err == nil {
		return "/usr/bin/docker"
	}
	p, err := exec.LookPath("docker")
	if err != nil {
		SkipOutsideCI(t, "the docker CLI is missing (make deps installs docker.io)")
	}
	return p
}

// start runs a daemon inside the node namespace. nsenter execs it in place,
// so the PID started is the daemon's.
func (d *Docker) start(t testing.TB, name, nsenter, bin string, args ...string) {
	t.Helper()
	logPath := filepath.Join(d.dir, name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(nsenter, append([]string{"--net=/run/netns/" + d.Node.Name, "--", bin}, args...)...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR=" + filepath.Join(d.dir, "data")}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Should the test binary die, the daemon dies with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	dm := &dockerDaemon{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(dm.done) }()
	d.daemons = append(d.daemons, dm)
}

// checkIsolation verifies that every daemon runs in the node namespace and
// that the root namespace (the test's own) shows no trace of Docker.
func (d *Docker) checkIsolation() error {
	node, err := nsID("/run/netns/" + d.Node.Name)
	if err != nil {
		return err
	}
	self, err := nsID("/proc/self/ns/net")
	if err != nil {
		return err
	}
	if node == self {
		return fmt.Errorf("%s is the test's own network namespace", d.Node)
	}
	for _, dm := range d.daemons {
		pid := dm.cmd.Process.Pid
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if filepath.Base(exe) != dm.name {
			return fmt.Errorf("PID %d is %q, not %s", pid, exe, dm.name)
		}
		id, err := nsID(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			return err
		}
		if id != node {
			return fmt.Errorf("%s (PID %d) runs in network namespace %s, not %s's %s", dm.name, pid, id, d.Node, node)
		}
	}
	return checkRootClean()
}

// nsID names a namespace by the device and inode of its nsfs file.
func nsID(p string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino), nil
}

var dockerVeth = regexp.MustCompile(`^veth[0-9a-f]{7}$`)

// checkRootClean reports Docker links or iptables chains in the test's own
// network namespace (normally the root one).
func checkRootClean() error {
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		return fmt.Errorf("ip link: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if name == "docker0" || strings.HasPrefix(name, "br-") || dockerVeth.MatchString(name) {
			return fmt.Errorf("the root network namespace has Docker's link %s", name)
		}
	}
	for _, save := range []string{"iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save", "ip6tables-legacy-save"} {
		if _, err := exec.LookPath(save); err != nil {
			continue
		}
		out, _ := exec.Command(save).Output()
		if strings.Contains(string(out), "DOCKER") {
			return fmt.Errorf("the root network namespace has DOCKER rules (%s)", save)
		}
	}
	return nil
}

// waitUntil polls ready every 50ms until it says yes, the daemon dies
// (died closes) or timeout passes; what says what it waited for.
func waitUntil(ready func() bool, timeout time.Duration, died <-chan struct{}, what string) error {
	deadline := time.Now().Add(timeout)
	for !ready() {
		select {
		case <-died:
			return errors.New("it exited")
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s after %s", what, timeout)
		}
	}
	return nil
}

func waitDial(sock string, timeout time.Duration, died <-chan struct{}) error {
	return waitUntil(func() bool {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, timeout, died, sock+" not listening")
}

func (d *Docker) waitPing(timeout time.Duration, died <-chan struct{}) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", d.Socket)
		},
	}}
	defer client.CloseIdleConnections()
	return waitUntil(func() bool {
		resp, err := client.Get("http://docker/_ping")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, timeout, died, "no answer to /_ping")
}

// logTail returns the end of each daemon's log, for failure messages.
func (d *Docker) logTail() string {
	var b strings.Builder
	for _, dm := range d.daemons {
		data, _ := os.ReadFile(dm.log)
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		if len(lines) > 25 {
			lines = lines[len(lines)-25:]
		}
		fmt.Fprintf(&b, "--- %s log (end)\n%s\n", dm.name, strings.Join(lines, "\n"))
	}
	return b.String()
}

// stop removes the containers, stops dockerd then containerd by the PIDs
// started, kills shims left behind, unmounts leftovers, removes the cgroup
// parent and the host paths the daemons created, and checks the root
// namespace is still clean.
func (d *Docker) stop(t testing.TB, created []string) {
	t.Helper()
	if len(d.daemons) == 2 {
		select {
		case <-d.daemons[1].done:
		default:
			if ids, err := d.cliTimeout(30*time.Second, "ps", "-aq"); err == nil && strings.TrimSpace(ids) != "" {
				_, _ = d.cliTimeout(60*time.Second, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
			}
		}
	}
	for i := len(d.daemons) - 1; i >= 0; i-- {
		dm := d.daemons[i]
		_ = dm.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-dm.done:
		case <-time.After(20 * time.Second):
			t.Errorf("%s (PID %d) ignored SIGTERM for 20s; killing it", dm.name, dm.cmd.Process.Pid)
			_ = dm.cmd.Process.Kill()
			<-dm.done
		}
	}
	// containerd-shim-runc-v2 processes outlive containerd by design; ours
	// name our private directory on their command line. Their children (the
	// containers) go first.
	for _, pid := range pidsMentioning(d.dir) {
		t.Logf("killing leftover process %d (%s) and its descendants", pid, cmdline(pid))
		sock := shimSocket(cmdline(pid))
		killTree(pid)
		if sock != "" {
			_ = os.Remove(sock)
		}
	}
	for _, m := range mountsUnder(d.dir) {
		_ = unix.Unmount(m, unix.MNT_DETACH)
	}
	for _, root := range cgroupRoots() {
		removeEmptyDirs(filepath.Join(root, d.cgroup))
	}
	for _, p := range created {
		if strings.HasSuffix(p, ".json") {
			_ = os.Remove(p)
		} else {
			removeEmptyDirs(p)
		}
	}
	if err := checkRootClean(); err != nil {
		t.Errorf("after stopping Docker: %v", err)
	}
}

func pidsMentioning(s string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if strings.Contains(cmdline(pid), s) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// shimSocket returns the socket a containerd-shim-runc-v2 with this command
// line listens on: containerd 1.6 puts it in /run/containerd/s whatever its
// configuration, named by sha256(address/namespace/id). The shim removes it
// when it exits normally, not when it is killed.
func shimSocket(cmdline string) string {
	args := strings.Fields(cmdline)
	flags := map[string]string{}
	for i := 0; i+1 < len(args); i++ {
		if strings.HasPrefix(args[i], "-") {
			flags[args[i]] = args[i+1]
		}
	}
	if !strings.HasSuffix(args[0], "containerd-shim-runc-v2") || flags["-address"] == "" || flags["-id"] == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(filepath.Join(flags["-address"], flags["-namespace"], flags["-id"])))
	return filepath.Join("/run/containerd/s", hex.EncodeToString(sum[:]))
}

// killTree kills pid's descendants, then pid.
func killTree(pid int) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", child))
		if strings.Contains(string(status), fmt.Sprintf("\nPPid:\t%d\n", pid)) {
			killTree(child)
		}
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

func cmdline(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return strings.ReplaceAll(string(b), "\x00", " ")
}

// mountsUnder lists the mount points under dir, deepest first.
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if strings.HasPrefix(mp, dir+"/") {
			mounts = append(mounts, mp)
		}
	}
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i]) > len(mounts[j]) })
	return mounts
}

func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cgroupRoots are the hierarchies dockerd's cgroupfs driver writes under:
// each v1 controller, and the v2 root (unified or hybrid).
func cgroupRoots() []string {
	roots := []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"}
	entries, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range entries {
		if e.IsDir() {
			roots = append(roots, filepath.Join("/sys/fs/cgroup", e.Name()))
		}
	}
	return roots
}

// removeEmptyDirs removes dir's empty directories bottom-up, dir included.
func removeEmptyDirs(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() {
			removeEmptyDirs(filepath.Join(dir, e.Name()))
		}
	}
	_ = os.Remove(dir)
}

// cliTimeout runs the docker CLI against this engine and returns its stdout.
func (d *Docker) cliTimeout(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return d.cliCmd(ctx, nil, args...)
}

func (d *Docker) cliCmd(ctx context.Context, stdin io.Reader, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, d.cli, append([]string{"--host", "unix://" + d.Socket}, args...)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + filepath.Join(d.dir, "cli"),
		"DOCKER_CONFIG=" + filepath.Join(d.dir, "cli")}
	cmd.Stdin = stdin
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out), nil
}

// CLI runs `docker --host unix://<Socket> args...` and returns its stdout;
// failure fails the test. Start containers with Run, not CLI: CLI refuses
// run, create and --privileged.
func (d *Docker) CLI(t testing.TB, args ...string) string {
	t.Helper()
	for i, a := range args {
		if a == "--privileged" || strings.HasPrefix(a, "--privileged=") {
			t.Fatalf("docker %s: --privileged is not allowed", strings.Join(args, " "))
		}
		if i <= 1 && (a == "run" || a == "create") && (i == 0 || args[0] == "container") {
			t.Fatalf("docker %s: start containers with Docker.Run", strings.Join(args, " "))
		}
	}
	out, err := d.cliTimeout(2*time.Minute, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Run starts a container from a local image (docker run -d --pull never)
// with cmd as its command, and returns its ID.
func (d *Docker) Run(t testing.TB, image string, cmd ...string) string {
	t.Helper()
	return d.RunOpts(t, nil, image, cmd...)
}

// forbiddenRunOpts are the docker run options that could reach the root
// namespace or the host: host namespaces, privileges, devices and mounts.
var forbiddenRunOpts = []string{"--privileged", "-v", "--volume", "--mount", "--device", "--cap-add",
	"--security-opt", "--device-cgroup-rule", "--volumes-from"}

var hostNamespaceOpts = []string{"--pid", "--network", "--net", "--ipc", "--uts", "--userns", "--cgroupns"}

// RunOpts is Run with docker run options (--network NAME or container:ID,
// --name, -e, --init, --dns, ...). Privileges, host namespaces, volumes and
// devices are refused: containers keep Docker's defaults.
func (d *Docker) RunOpts(t testing.TB, opts []string, image string, cmd ...string) string {
	t.Helper()
	for i, o := range opts {
		name, value, hasValue := strings.Cut(o, "=")
		if !hasValue && i+1 < len(opts) {
			value = opts[i+1]
		}
		for _, f := range forbiddenRunOpts {
			if name == f || (f == "-v" && strings.HasPrefix(name, "-v") && !strings.HasPrefix(name, "--")) {
				t.Fatalf("docker run %s: not allowed in these tests", o)
			}
		}
		for _, f := range hostNamespaceOpts {
			if name == f && value == "host" {
				t.Fatalf("docker run %s host: not allowed in these tests", name)
			}
		}
	}
	args := append([]string{"run", "-d", "--pull", "never"}, opts...)
	out, err := d.cliTimeout(2*time.Minute, append(append(args, image), cmd...)...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// Exec runs a command in a running container (docker exec) and returns its
// stdout; the error carries stderr. It gives up after a minute.
func (d *Docker) Exec(t testing.TB, id string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return d.cliCmd(ctx, nil, append([]string{"exec", id}, args...)...)
}

// ContainerPID returns the host PID of the container's first process.
func (d *Docker) ContainerPID(t testing.TB, id string) int {
	t.Helper()
	out := d.CLI(t, "inspect", "--format", "{{.State.Pid}}", id)
	pid, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil || pid <= 0 {
		t.Fatalf("container %s has no PID (%q)", id, out)
	}
	return pid
}

// NetnsPath returns /proc/PID/ns/net of the container, for nsenter --net.
func (d *Docker) NetnsPath(t testing.TB, id string) string {
	t.Helper()
	return fmt.Sprintf("/proc/%d/ns/net", d.ContainerPID(t, id))
}

// BuildImage imports an image named name: a static busybox (sh, ip, nc,
// wget, ...) plus files, each host file (value) copied with its mode to its
// path in the image (key).
func (d *Docker) BuildImage(t testing.TB, name string, files map[string]string) {
	t.Helper()
	bb := busyboxInfo(t)
	d.importImage(t, name, files, func(tw *trackedTar, skip func(string) bool) error {
		return writeBusybox(tw, bb, skip)
	})
}

// BuildBotocoreImage is BuildImage on a Debian root with python3 and
// python3-botocore (1.29, bookworm's), plus busybox: the packages' files,
// unpacked without maintainer scripts from the machine's apt mirror once per
// machine, cached under os.TempDir().
func (d *Docker) BuildBotocoreImage(t testing.TB, name string, files map[string]string) {
	t.Helper()
	base := botocoreRootfsTar(t)
	d.importImage(t, name, files, func(tw *trackedTar, skip func(string) bool) error {
		f, err := os.Open(base)
		if err != nil {
			return err
		}
		defer f.Close()
		tr := tar.NewReader(f)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
			if skip(h.Name) {
				continue
			}
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			if _, err := io.Copy(tw, tr); err != nil {
				return err
			}
		}
	})
}

// importImage streams base (whose entries skip may drop) plus files into
// docker import.
func (d *Docker) importImage(t testing.TB, name string, files map[string]string, base func(*trackedTar, func(string) bool) error) {
	t.Helper()
	dests := map[string]bool{}
	for dest := range files {
		dests[strings.TrimPrefix(path.Clean("/"+dest), "/")] = true
	}
	pr, pw := io.Pipe()
	go func() {
		tw := &trackedTar{Writer: tar.NewWriter(pw), names: map[string]bool{}}
		err := base(tw, func(n string) bool { return dests[strings.TrimSuffix(path.Clean(n), "/")] })
		if err == nil {
			err = writeFiles(tw, files)
		}
		if err == nil {
			err = tw.Close()
		}
		pw.CloseWithError(err)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	_, err := d.cliCmd(ctx, pr, "import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "-", name)
	pr.CloseWithError(io.ErrClosedPipe) // unblocks the writer if import failed early
	if err != nil {
		t.Fatalf("building image %s: %v", name, err)
	}
}

// trackedTar is a tar writer that remembers the names it wrote (without
// trailing slashes), so that no path is written twice: docker import refuses
// duplicates.
type trackedTar struct {
	*tar.Writer
	names map[string]bool
}

func (w *trackedTar) WriteHeader(h *tar.Header) error {
	w.names[strings.TrimSuffix(h.Name, "/")] = true
	return w.Writer.WriteHeader(h)
}

func writeFiles(tw *trackedTar, files map[string]string) error {
	dests := make([]string, 0, len(files))
	for dest := range files {
		dests = append(dests, dest)
	}
	sort.Strings(dests)
	for _, dest := range dests {
		name := strings.TrimPrefix(path.Clean("/"+dest), "/")
		for _, dir := range parents(name) {
			if !tw.names[dir] {
				if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755}); err != nil {
					return err
				}
			}
		}
		if err := copyIntoTar(tw, files[dest], name); err != nil {
			return err
		}
	}
	return nil
}

func parents(name string) []string {
	var out []string
	for dir := path.Dir(name); dir != "." && dir != "/"; dir = path.Dir(dir) {
		out = append([]string{dir}, out...)
	}
	return out
}

func copyIntoTar(tw *trackedTar, hostPath, name string) error {
	f, err := os.Open(hostPath)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", hostPath)
	}
	h := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: int64(fi.Mode().Perm()), Size: fi.Size(), ModTime: fi.ModTime()}
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	_, err = io.Copy(tw, f)
	return err
}

// busybox is the host's static busybox and its applets' paths.
type busybox struct {
	path    string
	applets []string
}

// imageBases caches, once per test process, what images are built from.
var imageBases struct {
	busyboxOnce sync.Once
	busybox     busybox
	busyboxErr  error

	botocoreOnce sync.Once
	botocoreTar  string
	botocoreErr  error
}

func busyboxInfo(t testing.TB) busybox {
	t.Helper()
	imageBases.busyboxOnce.Do(func() {
		p, err := exec.LookPath("busybox")
		if err != nil {
			imageBases.busyboxErr = errors.New("busybox is missing (make deps installs busybox-static)")
			return
		}
		f, err := elf.Open(p)
		if err != nil {
			imageBases.busyboxErr = fmt.Errorf("%s: %v", p, err)
			return
		}
		defer f.Close()
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				imageBases.busyboxErr = fmt.Errorf("%s is dynamically linked; install busybox-static (make deps does)", p)
				return
			}
		}
		out, err := exec.Command(p, "--list-full").Output()
		if err != nil {
			imageBases.busyboxErr = fmt.Errorf("busybox --list-full: %v", err)
			return
		}
		imageBases.busybox = busybox{path: p, applets: strings.Fields(string(out))}
	})
	if imageBases.busyboxErr != nil {
		SkipOutsideCI(t, imageBases.busyboxErr.Error())
	}
	return imageBases.busybox
}

// writeBusybox writes a minimal root: the usual directories, /etc/passwd and
// /etc/group with root and nobody, bin/busybox and its applets as symlinks.
// skip drops entries that exist already or that the caller's files replace.
func writeBusybox(tw *trackedTar, bb busybox, skip func(string) bool) error {
	now := time.Now()
	for _, dir := range []struct {
		name string
		mode int64
	}{{"bin", 0o755}, {"sbin", 0o755}, {"usr", 0o755}, {"usr/bin", 0o755}, {"usr/sbin", 0o755},
		{"etc", 0o755}, {"root", 0o700}, {"tmp", 0o1777}, {"var", 0o755}, {"var/tmp", 0o1777},
		{"proc", 0o755}, {"sys", 0o755}, {"dev", 0o755}, {"run", 0o755}} {
		if skip(dir.name) {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir.name + "/", Mode: dir.mode, ModTime: now}); err != nil {
			return err
		}
	}
	for name, content := range map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
		"etc/group":  "root:x:0:\nnogroup:x:65534:\n",
	} {
		if skip(name) {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(content)), ModTime: now}); err != nil {
			return err
		}
		if _, err := io.WriteString(tw, content); err != nil {
			return err
		}
	}
	if !skip("bin/busybox") {
		if err := copyIntoTar(tw, bb.path, "bin/busybox"); err != nil {
			return err
		}
	}
	for _, a := range bb.applets {
		if a == "bin/busybox" || skip(a) {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: a, Linkname: "/bin/busybox", Mode: 0o777, ModTime: now}); err != nil {
			return err
		}
	}
	return nil
}

// botocoreRootfsVersion names the cached root's layout; change it to rebuild.
const botocoreRootfsVersion = "v1"

// botocoreRootfsTar returns a tar of python3-botocore's dependency closure
// unpacked (apt-get --download-only with an empty dpkg status, then dpkg-deb
// -x: no maintainer scripts run; docs, man pages and locales dropped) plus
// busybox. It is built once per machine (a few seconds; about 140 MB) into
// os.TempDir() and shared by test runs, like AEMMBinary.
func botocoreRootfsTar(t testing.TB) string {
	t.Helper()
	bb := busyboxInfo(t)
	imageBases.botocoreOnce.Do(func() {
		dir := filepath.Join(os.TempDir(), "imds-proxy-test-images")
		final := filepath.Join(dir, "botocore-rootfs-"+botocoreRootfsVersion+".tar")
		imageBases.botocoreTar = final
		if _, err := os.Stat(final); err == nil {
			return
		}
		imageBases.botocoreErr = buildBotocoreRootfs(dir, final, bb)
	})
	if imageBases.botocoreErr != nil {
		t.Fatal(imageBases.botocoreErr)
	}
	return imageBases.botocoreTar
}

func buildBotocoreRootfs(dir, final string, bb busybox) error {
	for _, tool := range []string{"apt-get", "dpkg-deb"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("the botocore image needs %s (Debian): %v", tool, err)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	work, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	debs, rootfs, status := filepath.Join(work, "debs"), filepath.Join(work, "rootfs"), filepath.Join(work, "status")
	for _, d := range []string{filepath.Join(debs, "partial"), rootfs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := os.WriteFile(status, nil, 0o644); err != nil {
		return err
	}
	// An empty dpkg status makes apt fetch the whole closure, libc included.
	cmd := exec.Command("apt-get", "install", "-y", "-qq", "--download-only", "--no-install-recommends",
		"-o", "Dir::State::Status="+status, "-o", "Dir::Cache::Archives="+debs, "-o", "Debug::NoLocking=1",
		"python3-botocore")
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("downloading python3-botocore and its dependencies (needs apt lists: apt-get update): %v\n%s", err, out)
	}
	pkgs, _ := filepath.Glob(filepath.Join(debs, "*.deb"))
	if len(pkgs) == 0 {
		return errors.New("apt-get downloaded no packages for python3-botocore")
	}
	for _, p := range pkgs {
		if out, err := exec.Command("dpkg-deb", "-x", p, rootfs).CombinedOutput(); err != nil {
			return fmt.Errorf("dpkg-deb -x %s: %v\n%s", p, err, out)
		}
	}
	tmp, err := os.CreateTemp(dir, "rootfs-*.tar")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	bw := bufio.NewWriterSize(tmp, 1<<20)
	tw := &trackedTar{Writer: tar.NewWriter(bw), names: map[string]bool{}}
	err = filepath.WalkDir(rootfs, func(p string, e fs.DirEntry, err error) error {
		if err != nil || p == rootfs {
			return err
		}
		rel, _ := filepath.Rel(rootfs, p)
		for _, drop := range []string{"usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "usr/share/lintian"} {
			if rel == drop {
				return filepath.SkipDir
			}
		}
		fi, err := e.Info()
		if err != nil {
			return err
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		h.Name, h.Uname, h.Gname = rel, "", ""
		if fi.IsDir() {
			h.Name += "/"
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = io.Copy(tw, f)
			return err
		}
		return nil
	})
	if err == nil {
		err = writeBusybox(tw, bb, func(n string) bool { return tw.names[n] })
	}
	if err == nil {
		err = tw.Close()
	}
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing the botocore root: %v", err)
	}
	return os.Rename(tmp.Name(), final)
}
