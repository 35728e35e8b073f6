package testutil

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDocker starts a real Docker engine in a node namespace, runs containers
// from locally built images on its docker0, and checks that nothing of it
// reaches the root namespace or outlives the test.
func TestDocker(t *testing.T) {
	node := NewNetns(t)
	hostPathsBefore := map[string]bool{}
	for _, p := range dockerHostPaths {
		_, err := os.Lstat(p)
		hostPathsBefore[p] = err == nil
	}
	var d *Docker
	t.Run("engine", func(t *testing.T) {
		start := time.Now()
		d = StartDocker(t, node)
		t.Logf("dockerd answered after %s", time.Since(start).Round(time.Millisecond))

		if out := node.Run(t, "ip", "-4", "-o", "addr", "show", "docker0"); !strings.Contains(out, "172.17.0.1/16") {
			t.Errorf("docker0 in %s: %q, want 172.17.0.1/16", node, out)
		}

		// A static Go binary (the demo client, the AWS SDK for Go v2) as a file of a busybox image.
		client := filepath.Join(t.TempDir(), "demo-client")
		build := exec.Command("go", "build", "-o", client, "github.com/imds-proxy/imds-proxy/demo/client")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("building the demo client: %v\n%s", err, out)
		}
		start = time.Now()
		d.BuildImage(t, "imdsp-busybox", map[string]string{"/usr/local/bin/demo-client": client})
		t.Logf("busybox image imported in %s", time.Since(start).Round(time.Millisecond))

		start = time.Now()
		id := d.Run(t, "imdsp-busybox", "sleep", "3600")
		t.Logf("container started in %s", time.Since(start).Round(time.Millisecond))

		ip := strings.TrimSpace(d.CLI(t, "inspect", "--format", "{{.NetworkSettings.IPAddress}}", id))
		if !strings.HasPrefix(ip, "172.17.") {
			t.Errorf("container address %q, want 172.17.x on docker0", ip)
		}
		if out, err := d.Exec(t, id, "ip", "-4", "-o", "addr", "show", "eth0"); err != nil || !strings.Contains(out, ip+"/16") {
			t.Errorf("eth0 in the container: %q, %v; want %s/16", out, err, ip)
		}
		if out := node.Run(t, "ip", "-o", "link", "show", "master", "docker0"); !strings.Contains(out, "veth") {
			t.Errorf("no veth on docker0 in %s: %q", node, out)
		}
		pid := d.ContainerPID(t, id)
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(status), "CapEff:\t00000000a80425fb") {
			t.Errorf("container PID 1 capabilities are not Docker's defaults:\n%s", grepLines(string(status), "Cap"))
		}
		if out, err := d.Exec(t, id, "grep", "CapEff", "/proc/self/status"); err != nil || !strings.Contains(out, "a80425fb") {
			t.Errorf("docker exec capabilities: %q, %v", out, err)
		}
		containerNS, err := nsID(d.NetnsPath(t, id))
		if err != nil {
			t.Fatal(err)
		}
		nodeNS, _ := nsID("/run/netns/" + node.Name)
		selfNS, _ := nsID("/proc/self/ns/net")
		if containerNS == nodeNS || containerNS == selfNS {
			t.Errorf("the container shares a network namespace with the node or the root")
		}
		if out, err := d.Exec(t, id, "sh", "-c", "demo-client -h 2>&1"); err != nil || !strings.Contains(out, "-calls") {
			t.Errorf("the static demo client did not run in the container: %q, %v", out, err)
		}
		// A user-defined bridge (br-<id>), also in the node namespace, and a
		// container sharing another's network namespace.
		netID := strings.TrimSpace(d.CLI(t, "network", "create", "--subnet", "172.30.0.0/24", "imdsp-net"))
		other := d.RunOpts(t, []string{"--network", "imdsp-net"}, "imdsp-busybox", "sleep", "3600")
		if out := node.Run(t, "ip", "-4", "-o", "addr", "show", "br-"+netID[:12]); !strings.Contains(out, "172.30.0.1/24") {
			t.Errorf("br-%s in %s: %q", netID[:12], node, out)
		}
		peer := d.RunOpts(t, []string{"--network", "container:" + other}, "imdsp-busybox", "sleep", "3600")
		if a, b := d.NetnsPath(t, other), d.NetnsPath(t, peer); mustNSID(t, a) != mustNSID(t, b) {
			t.Errorf("--network container: did not share the network namespace")
		}
		if err := checkRootClean(); err != nil {
			t.Error(err)
		}

		// Python 3 and botocore (the AWS CLI v1 and boto3 core) in a container.
		start = time.Now()
		d.BuildBotocoreImage(t, "imdsp-botocore", nil)
		t.Logf("botocore image built in %s", time.Since(start).Round(time.Millisecond))
		start = time.Now()
		py := d.Run(t, "imdsp-botocore", "sleep", "3600")
		out, err := d.Exec(t, py, "python3", "-c", "import botocore.session; botocore.session.get_session(); print(botocore.__version__)")
		if err != nil || !strings.HasPrefix(out, "1.") {
			t.Errorf("botocore in a container: %q, %v", out, err)
		}
		t.Logf("botocore %s ran in a container in %s", strings.TrimSpace(out), time.Since(start).Round(time.Millisecond))
	})
	if d == nil || len(d.daemons) == 0 {
		return
	}
	// The engine's cleanup has run.
	for _, dm := range d.daemons {
		select {
		case <-dm.done:
		default:
			t.Errorf("%s (PID %d) still runs after cleanup", dm.name, dm.cmd.Process.Pid)
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", dm.cmd.Process.Pid)); err == nil {
			t.Errorf("PID %d (%s) still exists after cleanup: %s", dm.cmd.Process.Pid, dm.name, cmdline(dm.cmd.Process.Pid))
		}
	}
	if pids := pidsMentioning(d.dir); len(pids) > 0 {
		t.Errorf("processes of the engine left behind: %v", pids)
	}
	if m := mountsUnder(d.dir); len(m) > 0 {
		t.Errorf("mounts left behind: %v", m)
	}
	if _, err := os.Stat(d.dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s left behind (%v)", d.dir, err)
	}
	for _, p := range dockerHostPaths {
		if _, err := os.Lstat(p); err == nil && !hostPathsBefore[p] {
			t.Errorf("%s left behind", p)
		}
	}
	for _, root := range cgroupRoots() {
		if _, err := os.Stat(filepath.Join(root, d.cgroup)); err == nil {
			t.Errorf("cgroup %s left behind", filepath.Join(root, d.cgroup))
		}
	}
	if err := checkRootClean(); err != nil {
		t.Error(err)
	}
}

func mustNSID(t *testing.T, p string) string {
	t.Helper()
	id, err := nsID(p)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func grepLines(s, substr string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, substr) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
