package main

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// emulatedWorkload is a container as the kernel sees it behind a node
// agent: a network namespace wired by the VPC CNI, and a cgroup shaped
// like its runtime's path.
type emulatedWorkload struct {
	name   string
	ns     *testutil.Netns
	addr   string
	cgroup string // below the test's cgroup parent
	// what attribution must find from the cgroup
	containerID, podUID, taskID, runtime string
	// what the workload sources name it, where a test runs them
	platform, namespace, workload, container string
}

const (
	podA       = "7d1f3a52-0c4e-4b8a-9e61-2f0d5c7b8a91"
	podB       = "c2b9e8f7-6a5d-4c3b-8a19-0f1e2d3c4b5a"
	ecsTask    = "8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"
	containerA = "a1c2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80910"
	containerB = "b1c2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80910"
	containerC = "c1c2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80910"
	containerD = "d1c2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80910"
)

// newWorkloadNode is a node on the VPC CNI's wiring with four workloads:
// two pods, an ECS task's container and a plain Docker container.
func newWorkloadNode(t *testing.T) (*testutil.EC2, []emulatedWorkload) {
	e := testutil.NewEC2(t, testutil.WiredBy(testutil.VPCCNI), testutil.IMDSv1Allowed())
	return e, []emulatedWorkload{
		{name: "pod A", ns: e.Task, addr: testutil.VPCCNI.ContainerAddr, cgroup: "kubepods/besteffort/pod" + podA + "/" + containerA,
			containerID: containerA, podUID: podA, runtime: "containerd"},
		{name: "pod B", ns: testutil.AddVPCCNIPod(t, e, "eni5b6c7d8e9f0", "10.0.5.18"), addr: "10.0.5.18", cgroup: "kubepods/besteffort/pod" + podB + "/" + containerB,
			containerID: containerB, podUID: podB, runtime: "containerd"},
		{name: "ECS task", ns: testutil.AddVPCCNIPod(t, e, "eni6c7d8e9f0a1", "10.0.5.19"), addr: "10.0.5.19", cgroup: "ecs/" + ecsTask + "/" + containerC,
			containerID: containerC, taskID: ecsTask, runtime: "docker", platform: "ecs", namespace: "prod", workload: "billing:7", container: "app"},
		{name: "Docker container", ns: testutil.AddVPCCNIPod(t, e, "eni7d8e9f0a1b2", "10.0.5.20"), addr: "10.0.5.20", cgroup: "docker/" + containerD,
			containerID: containerD, runtime: "docker"},
	}
}

// curlIn runs curl in w's container, with Docker's default capabilities,
// and returns the status IMDS (through the node agent) answered.
func curlIn(t *testing.T, cgroups *testutil.Cgroups, w emulatedWorkload, path string, header ...string) string {
	t.Helper()
	argv := []string{"curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"}
	for _, h := range header {
		argv = append(argv, "-H", h)
	}
	out, err := cgroups.Container(t, w.ns, w.cgroup, true, append(argv, "http://169.254.169.254"+path)...).Output()
	if err != nil {
		t.Fatalf("curl in %s: %v (%s)", w.name, err, out)
	}
	return string(out)
}

// v1CallerRow is a /v1-callers row as an operator reads it.
type v1CallerRow struct {
	Caller      string `json:"caller"`
	PID         int    `json:"pid"`
	UID         *int   `json:"uid"`
	Executable  string `json:"executable"`
	Runtime     string `json:"runtime"`
	ContainerID string `json:"container_id"`
	PodUID      string `json:"pod_uid"`
	TaskID      string `json:"task_id"`
	Platform    string `json:"platform"`
	Namespace   string `json:"namespace"`
	Workload    string `json:"workload"`
	Pod         string `json:"pod"`
	Container   string `json:"container"`
	Count       int    `json:"count"`
}

func v1Callers(t *testing.T, e *testutil.EC2) []v1CallerRow {
	t.Helper()
	status, body := e.Node.Get(t, "127.0.0.1:9169", "/v1-callers", nil)
	if status != http.StatusOK {
		t.Fatalf("/v1-callers: %d %s", status, body)
	}
	var rows []v1CallerRow
	if err := json.Unmarshal([]byte(body), &rows); err != nil {
		t.Fatalf("/v1-callers: %v\n%s", err, body)
	}
	return rows
}

// nodeAgentCaps are the node agent's capabilities in the manifests
// (deploy/kubernetes/node, deploy/ecs): iptables needs NET_ADMIN and
// NET_RAW, and seeing other processes' namespace and descriptor links
// needs SYS_PTRACE.
var nodeAgentCaps = []string{"+net_admin", "+net_raw", "+sys_ptrace"}

// asNodeAgent runs the agent as root with caps only, as its manifests do.
func asNodeAgent(caps ...string) testutil.ProxyOption {
	return testutil.Wrapped("setpriv", "--inh-caps=-all", "--bounding-set=-all,"+strings.Join(caps, ","))
}

// TestNodeAttributesEachContainer: behind a node agent with its manifests'
// capabilities, each workload's tokenless request is traced to its process
// (PID, UID, executable) and to the container and pod or task its cgroup
// names. Without SYS_PTRACE the agent says at start that it cannot.
func TestNodeAttributesEachContainer(t *testing.T) {
	e, workloads := newWorkloadNode(t)
	cgroups := testutil.NewCgroups(t)
	ecs := testutil.StartECSIntrospectionStandIn(t, e.Node, "127.0.0.1:51678", "prod", testutil.ECSTask{
		Arn: "arn:aws:ecs:us-east-1:123456789012:task/prod/" + ecsTask, Family: "billing", Revision: "7",
		Containers: []testutil.ECSContainer{{DockerID: containerC, DockerName: "ecs-billing-7-app-d2f5", Name: "app"}}})
	agent := testutil.StartProxy(t, e.Node, binary, nodeArgs("--interfaces", "eni+", "--iptables-backend", "nft", "--ecs-introspection", ecs.URL),
		asNodeAgent(nodeAgentCaps...))
	var rows []v1CallerRow
	// Until the sources have answered once: the first requests may find them empty.
	waitFor(t, 10*time.Second, func() bool {
		for _, w := range workloads {
			if got := curlIn(t, cgroups, w, "/latest/meta-data/instance-id"); got != "200" {
				t.Fatalf("%s: tokenless GET answered %s, want 200 (--v1 allow)", w.name, got)
			}
		}
		rows = v1Callers(t, e)
		return slices.ContainsFunc(rows, func(r v1CallerRow) bool { return r.Workload != "" })
	}, "the workload sources to name a workload")
	for _, w := range workloads {
		var found *v1CallerRow
		for i := range rows {
			if rows[i].Caller == w.addr && (found == nil || rows[i].Workload != "") { // the named row, if the sources were late for the first
				found = &rows[i]
			}
		}
		switch {
		case found == nil:
			t.Errorf("%s (%s): no /v1-callers row in %+v", w.name, w.addr, rows)
		case found.PID == 0 || found.UID == nil || *found.UID != 0 || !strings.HasSuffix(found.Executable, "/curl"):
			t.Errorf("%s: process pid %d uid %v executable %q, want curl's, as root", w.name, found.PID, found.UID, found.Executable)
		case found.ContainerID != w.containerID || found.PodUID != w.podUID || found.TaskID != w.taskID || found.Runtime != w.runtime:
			t.Errorf("%s: container %+v, want id %s pod %q task %q runtime %s", w.name, *found, w.containerID, w.podUID, w.taskID, w.runtime)
		case found.Platform != w.platform || found.Namespace != w.namespace || found.Workload != w.workload || found.Container != w.container:
			t.Errorf("%s: workload %s %s/%s container %q, want %s %s/%s container %q", w.name,
				found.Platform, found.Namespace, found.Workload, found.Container, w.platform, w.namespace, w.workload, w.container)
		}
	}
	const warning = "cannot see the processes of other network namespaces"
	if strings.Contains(agent.Logs.String(), warning) {
		t.Errorf("the agent with SYS_PTRACE warns %q:\n%s", warning, agent.Logs.String())
	}
	agent.Terminate(t)

	agent = testutil.StartProxy(t, e.Node, binary, nodeArgs("--interfaces", "eni+", "--iptables-backend", "nft"), asNodeAgent("+net_admin", "+net_raw"))
	if !strings.Contains(agent.Logs.String(), warning) {
		t.Errorf("the agent without SYS_PTRACE does not say %q:\n%s", warning, agent.Logs.String())
	}
}
