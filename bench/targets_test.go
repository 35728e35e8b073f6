package bench

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// target is what the load goes to. pids lists its processes (nil: it runs
// in the test process, so its CPU and memory cannot be told apart).
type target struct {
	name string
	addr string
	pids func() []int
}

// passThroughFlags turn off caching and coalescing: imds-proxy as a plain
// forwarding proxy, to compare with nginx doing the same.
var passThroughFlags = []string{"--cache-ttl=0", "--coalesce=false"}

// proxyProc is a running imds-proxy sidecar.
type proxyProc struct {
	*testutil.Process
	addr string
}

func (p *proxyProc) pids() []int { return []int{p.Cmd.Process.Pid} }

// startProxy runs `imds-proxy sidecar --rules=false` on free loopback ports
// in front of upstream (never IMDS: --upstream is always given), and waits
// for /readyz, which passes once its upstream session is decided.
func startProxy(t testing.TB, bin, upstream string, extra ...string) *proxyProc {
	t.Helper()
	p := testutil.StartProxy(t, nil, bin, testutil.LoopbackSidecar(append([]string{"--upstream", upstream}, extra...)...))
	return &proxyProc{Process: p, addr: strings.TrimPrefix(p.API, "http://")}
}

// startGroup starts cmd as the leader of a new process group and, when the
// test ends, stops it: stop (if given) asks it nicely first, then the whole
// group it leads gets SIGKILL, so no child (nginx's workers) outlives it.
func startGroup(t testing.TB, cmd *exec.Cmd, stop func(*exec.Cmd, <-chan struct{})) <-chan struct{} {
	t.Helper()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", cmd.Path, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	pgid := cmd.Process.Pid
	t.Cleanup(func() {
		if stop != nil {
			stop(cmd, exited)
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-exited
	})
	return exited
}

// capBuffer keeps the first max bytes written to it.
type capBuffer struct {
	mu  sync.Mutex
	max int
	buf bytes.Buffer
}

func (b *capBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - b.buf.Len(); room > 0 {
		b.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (b *capBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// nginxPath finds the nginx binary (Debian puts it in /usr/sbin, which a
// non-root PATH may lack). IMDS_PROXY_BENCH_NGINX names another one, or
// "none" to run without nginx.
func nginxPath() (string, error) {
	if p := os.Getenv("IMDS_PROXY_BENCH_NGINX"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", errors.New("nginx: not installed")
		}
		return p, nil
	}
	if p, err := exec.LookPath("nginx"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("nginx: not installed")
}

// nginxConf is the configuration a user would write for an IMDS sidecar:
// workers per core, a keep-alive pool to the upstream, HTTP/1.1 upstream
// with the Connection header cleared, no access log. Every path is in the
// benchmark's own directory.
const nginxConf = `worker_processes auto;
pid {{dir}}/nginx.pid;
error_log {{dir}}/error.log warn;

events {
    worker_connections 1024;
}

http {
    access_log off;
    client_body_temp_path {{dir}}/client_body_temp;
    proxy_temp_path {{dir}}/proxy_temp;
    fastcgi_temp_path {{dir}}/fastcgi_temp;
    uwsgi_temp_path {{dir}}/uwsgi_temp;
    scgi_temp_path {{dir}}/scgi_temp;

    upstream imds {
        server {{upstream}};
        keepalive 32;
    }

    server {
        listen {{listen}};
        location / {
            proxy_pass http://imds;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
`

// nginxProc is a running nginx: the master and its workers.
type nginxProc struct {
	addr   string
	master int
}

// startNginx runs nginx in the foreground as a child, in front of
// upstream (host:port), on a free loopback port.
func startNginx(t testing.TB, bin, upstream string) *nginxProc {
	t.Helper()
	// Workers of a root master run as nobody: they must reach the temp paths.
	dir, err := os.MkdirTemp("", "imds-proxy-bench-nginx")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) }) // runs after nginx is stopped (cleanups are LIFO)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	n := &nginxProc{addr: testutil.FreeLoopbackAddr(t)}
	conf := strings.NewReplacer("{{dir}}", dir, "{{upstream}}", upstream, "{{listen}}", n.addr).Replace(nginxConf)
	confPath := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	logs := &capBuffer{max: 64 << 10}
	argv := append(nginxContainer(), bin, "-p", dir+"/", "-c", confPath, "-e", filepath.Join(dir, "error.log"), "-g", "daemon off;")
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logs, logs
	exited := startGroup(t, cmd, func(cmd *exec.Cmd, exited <-chan struct{}) {
		_ = cmd.Process.Signal(syscall.SIGTERM) // fast shutdown: the master stops its workers
		select {
		case <-exited:
		case <-time.After(3 * time.Second):
		}
	})
	if err := testutil.WaitListening(n.addr, 5*time.Second); err != nil {
		errLog, _ := os.ReadFile(filepath.Join(dir, "error.log"))
		t.Fatalf("nginx did not start: %v\n%s%s", err, logs, errLog)
	}
	n.master = cmd.Process.Pid
	if len(argv) > 0 && argv[0] != bin { // nginx's master is unshare's one child
		if kids := childrenOf(n.master); len(kids) == 1 {
			n.master = kids[0]
		}
	}
	select {
	case <-exited:
		t.Fatalf("nginx exited:\n%s", logs)
	default:
	}
	// Wait for the workers to exist, so that the first sample sees them.
	for deadline := time.Now().Add(2 * time.Second); len(n.pids()) < 2 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	return n
}

// pids is the master and its children (the workers).
// nginxContainer is the command prefix that runs nginx in a PID namespace
// of its own (as root, with util-linux's unshare), so that its workers die
// with its master however the test ends: killed, a test runs no cleanups,
// and orphaned workers would keep their port. Nil where that is not possible.
func nginxContainer() []string {
	unshare, err := exec.LookPath("unshare")
	if os.Geteuid() != 0 || err != nil {
		return nil
	}
	return []string{unshare, "--pid", "--fork", "--kill-child"}
}

func (n *nginxProc) pids() []int { return append([]int{n.master}, childrenOf(n.master)...) }

// childrenOf scans /proc for the processes whose parent is pid.
func childrenOf(pid int) []int {
	entries, _ := os.ReadDir("/proc")
	var kids []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if f, ok := procStatFields(p); ok && f[1] == strconv.Itoa(pid) {
			kids = append(kids, p)
		}
	}
	return kids
}

// procStatFields are the fields of /proc/PID/stat after the command name:
// [0] is state (field 3), [1] ppid (4), [11] utime (14), [12] stime (15).
func procStatFields(pid int) ([]string, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, false
	}
	f := strings.Fields(string(b[i+1:]))
	return f, len(f) > 12
}

// userHZ is the unit of utime and stime in /proc/PID/stat: USER_HZ, which
// Linux fixes at 100 for user space whatever the kernel's HZ.
const userHZ = 100

// cpuSeconds is utime+stime summed over pids (threads included).
func cpuSeconds(pids []int) float64 {
	var ticks int64
	for _, pid := range pids {
		f, ok := procStatFields(pid)
		if !ok {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		ticks += u + s
	}
	return float64(ticks) / userHZ
}

// memKiB sums one /proc/PID/status field (VmRSS, VmHWM) over pids.
func memKiB(pids []int, field string) int64 {
	var total int64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, field+":"); ok {
				kib, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
				total += kib
			}
		}
	}
	return total
}

// resetPeak resets VmHWM to the current RSS (clear_refs 5, Linux 4.0+), so
// that the next reading is the peak of one measurement. It reports whether
// every process allowed it.
func resetPeak(pids []int) bool {
	all := len(pids) > 0
	for _, pid := range pids {
		if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
			all = false
		}
	}
	return all
}

// busySeconds is the CPU time the whole machine spent in user and system
// mode since boot (/proc/stat; interrupts, steal and idle left out).
func busySeconds() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line) // cpu user nice system idle ...
	if len(f) < 4 || f[0] != "cpu" {
		return 0
	}
	var ticks int64
	for _, v := range f[1:4] {
		n, _ := strconv.ParseInt(v, 10, 64)
		ticks += n
	}
	return float64(ticks) / userHZ
}

// otherLoad tracks the CPU that processes outside the benchmark use while
// it measures: the machine's busy time less the test process's and the
// target's. Another build or test on a shared machine shows up here.
type otherLoad struct {
	machine, self float64
}

func startOtherLoad() otherLoad {
	return otherLoad{machine: busySeconds(), self: cpuSeconds([]int{os.Getpid()})}
}

// cores is the average number of cores used elsewhere since start, given
// the target's own CPU seconds in that time.
func (o otherLoad) cores(target float64, elapsed time.Duration) float64 {
	if elapsed <= 0 {
		return 0
	}
	other := busySeconds() - o.machine - (cpuSeconds([]int{os.Getpid()}) - o.self) - max(target, 0)
	return max(other, 0) / elapsed.Seconds()
}
