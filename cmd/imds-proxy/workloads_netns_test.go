package main

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/imds-proxy/imds-proxy/imdsapi"
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

// imdsv2In fetches a token and then path with it in w's container, and
// returns the status of the GET.
func imdsv2In(t *testing.T, cgroups *testutil.Cgroups, w emulatedWorkload, path string) string {
	t.Helper()
	out, err := cgroups.Container(t, w.ns, w.cgroup, true, "sh", "-c",
		`t=$(curl -s --max-time 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" http://169.254.169.254/latest/api/token) && `+
			`curl -s -o /dev/null -w "%{http_code}" --max-time 5 -H "X-aws-ec2-metadata-token: $t" http://169.254.169.254`+path).Output()
	if err != nil {
		t.Fatalf("IMDSv2 in %s: %v (%s)", w.name, err, out)
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

// kubeNode is newWorkloadNode's node in a Kubernetes cluster (a real
// kube-apiserver): pod A is web-5d9f8c7b6-x2x7q of Deployment web, pod B
// the bare pod batch-runner with an IRSA role, both in team-a and on
// kubeNodeName, with their containers' IDs and IPs in their status.
type kubeNode struct {
	e          *testutil.EC2
	workloads  []emulatedWorkload
	server     *testutil.KubeAPIServer
	kube       *testutil.KubeClient
	kubeconfig string // for an agent in the node namespace
	web        *corev1.Pod
}

const kubeNodeName = "ip-10-0-5-1.ec2.internal"

func newKubeNode(t *testing.T) kubeNode {
	const node = kubeNodeName
	e, workloads := newWorkloadNode(t)
	podA, podB := &workloads[0], &workloads[1]
	server := testutil.StartKubeAPIServer(t)
	kube := server.Client(t)
	testutil.KubeCreate(kube, &corev1.Namespace{TypeMeta: metav1.TypeMeta{Kind: "Namespace", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{Name: "team-a"}})
	// No controller manager runs to make it.
	testutil.KubeCreate(kube, &corev1.ServiceAccount{TypeMeta: metav1.TypeMeta{Kind: "ServiceAccount", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "default"}})
	deployment := testutil.KubeCreate(kube, &appsv1.Deployment{TypeMeta: metav1.TypeMeta{Kind: "Deployment", APIVersion: "apps/v1"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web"},
		Spec:       appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}, Template: podTemplate("web")}})
	replicaSet := testutil.KubeCreate(kube, &appsv1.ReplicaSet{TypeMeta: metav1.TypeMeta{Kind: "ReplicaSet", APIVersion: "apps/v1"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web-5d9f8c7b6", OwnerReferences: ownedBy("Deployment", "apps/v1", deployment.Name, deployment.UID)},
		Spec:       appsv1.ReplicaSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}, Template: podTemplate("web")}})
	web := testutil.KubeCreate(kube, &corev1.Pod{TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web-5d9f8c7b6-x2x7q", Labels: map[string]string{"app": "web"},
			OwnerReferences: ownedBy("ReplicaSet", "apps/v1", replicaSet.Name, replicaSet.UID)},
		Spec: corev1.PodSpec{NodeName: node, Containers: podTemplate("web").Spec.Containers}})
	batch := testutil.KubeCreate(kube, &corev1.Pod{TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "batch-runner"},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "worker", Image: "public.ecr.aws/docker/library/busybox:1.37",
			Env: []corev1.EnvVar{{Name: "AWS_ROLE_ARN", Value: "arn:aws:iam::123456789012:role/batch"},
				{Name: "AWS_WEB_IDENTITY_TOKEN_FILE", Value: "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"}}}}}})
	for _, p := range []struct {
		pod       *corev1.Pod
		w         *emulatedWorkload
		workload  string
		container string
	}{{web, podA, "Deployment/web", "app"}, {batch, podB, "Pod/batch-runner", "worker"}} {
		kube.SetContainerStatuses(p.pod, map[string]string{p.container: "containerd://" + p.w.containerID}, nil)
		kube.SetPodIPs(p.pod, "", p.w.addr)
		// The emulated container's cgroup names the pod the API server made.
		p.w.podUID, p.w.cgroup = string(p.pod.UID), "kubepods/besteffort/pod"+string(p.pod.UID)+"/"+p.w.containerID
		p.w.platform, p.w.namespace, p.w.workload, p.w.container = "kubernetes", "team-a", p.workload, p.container
	}

	return kubeNode{e: e, workloads: workloads, server: server, kube: kube, kubeconfig: server.Kubeconfig(t, server.ReachableFrom(t, e.Node)), web: web}
}

// TestNodeEnforcesPerWorkloadPolicy: a node agent with the Kubernetes
// source (a real kube-apiserver) names each pod's workload in /v1-callers
// and its metrics, applies a pod's imds-proxy.io/v1 annotation to that pod
// alone within seconds and without a restart, and refuses the node role's
// credentials to a pod with an IRSA role of its own.
func TestNodeEnforcesPerWorkloadPolicy(t *testing.T) {
	k := newKubeNode(t)
	e, kube, web, kubeconfig, node := k.e, k.kube, k.web, k.kubeconfig, kubeNodeName
	podA, podB := &k.workloads[0], &k.workloads[1]
	cgroups := testutil.NewCgroups(t)
	agent := testutil.StartProxy(t, e.Node, kubernetesBinary, nodeArgs("--interfaces", "eni+", "--iptables-backend", "nft", "--v1", "warn",
		"--node-name", node, "--kubeconfig", kubeconfig, "--guard-own-identity"), asNodeAgent(nodeAgentCaps...))

	named := func(w *emulatedWorkload) bool {
		return slices.ContainsFunc(v1Callers(t, e), func(r v1CallerRow) bool {
			return r.Caller == w.addr && r.Platform == w.platform && r.Namespace == w.namespace && r.Workload == w.workload &&
				r.Container == w.container && r.PodUID == w.podUID && strings.HasSuffix(r.Executable, "/curl")
		})
	}
	for _, w := range []*emulatedWorkload{podA, podB} {
		waitFor(t, 20*time.Second, func() bool {
			if got := curlIn(t, cgroups, *w, "/latest/meta-data/instance-id"); got != "200" {
				t.Fatalf("%s: tokenless GET answered %s, want 200 (--v1 warn)", w.name, got)
			}
			return named(w)
		}, w.name+" named in /v1-callers by namespace, workload, container and executable")
	}

	for _, w := range []*emulatedWorkload{podA, podB} {
		line := `"workload":"` + w.workload + `","pod":`
		if !slices.ContainsFunc(strings.Split(agent.Logs.String(), "\n"), func(l string) bool {
			return strings.Contains(l, "IMDSv1 request (no token)") && strings.Contains(l, `"namespace":"team-a"`) && strings.Contains(l, line)
		}) {
			t.Errorf("no IMDSv1 warn line names %s's namespace and workload:\n%s", w.name, agent.Logs.String())
		}
	}

	imdsv2 := func(w emulatedWorkload, path string) string { return imdsv2In(t, cgroups, w, path) }
	const credentials = "/latest/meta-data/iam/security-credentials/"
	if got := imdsv2(*podB, credentials); got != "404" {
		t.Errorf("the IRSA pod's IMDSv2 GET of the node role's credentials: %s, want 404 (--guard-own-identity)", got)
	}
	if got := imdsv2(*podB, "/latest/meta-data/instance-id"); got != "200" {
		t.Errorf("the IRSA pod's IMDSv2 GET of the instance ID: %s, want 200", got)
	}
	if got := imdsv2(*podA, credentials); got != "200" {
		t.Errorf("the pod without an identity of its own: node role's credentials %s, want 200", got)
	}

	// Blocking pod A's workload by annotation: its tokenless requests get
	// 401 within seconds, its neighbour's are still served, and the agent
	// is the same process, with the same tokens.
	pid := agent.Cmd.Process.Pid
	kube.Patch("Pod", "team-a", web.Name, map[string]any{"metadata": map[string]any{"annotations": map[string]string{imdsapi.V1Key: "block"}}})
	blockedAt := time.Now()
	waitFor(t, 10*time.Second, func() bool { return curlIn(t, cgroups, *podA, "/latest/meta-data/instance-id") == "401" },
		"pod A's tokenless GET refused after its annotation")
	t.Logf("pod A's tokenless requests refused %s after the annotation", time.Since(blockedAt).Round(10*time.Millisecond))
	if got := curlIn(t, cgroups, *podB, "/latest/meta-data/instance-id"); got != "200" {
		t.Errorf("pod B's tokenless GET after pod A was blocked: %s, want 200", got)
	}
	if got := imdsv2(*podA, "/latest/meta-data/instance-id"); got != "200" {
		t.Errorf("pod A's IMDSv2 GET after the block: %s, want 200", got)
	}
	if agent.Cmd.Process.Pid != pid || agent.Cmd.ProcessState != nil {
		t.Error("the agent restarted")
	}

	status, metrics := e.Node.Get(t, "127.0.0.1:9169", "/metrics", nil)
	for _, series := range []string{
		`imds_proxy_workload_requests_total{imds_version="v1",namespace="team-a",sdk="curl",v1_policy="warn",workload="Deployment/web"}`,
		`imds_proxy_workload_requests_total{imds_version="v1",namespace="team-a",sdk="curl",v1_policy="block",workload="Deployment/web"}`,
		`imds_proxy_workload_requests_total{imds_version="v1",namespace="team-a",sdk="curl",v1_policy="warn",workload="Pod/batch-runner"}`,
		`imds_proxy_workload_requests_total{imds_version="v2",namespace="team-a",sdk="",v1_policy="",workload="Pod/batch-runner"}`,
		`imds_proxy_requests_total{imds_version="v2",method="GET",outcome="identity_guarded"} 1`,
	} {
		if status != http.StatusOK || !strings.Contains(metrics, series) {
			t.Errorf("/metrics (%d) lacks %s", status, series)
		}
	}
}

// podTemplate is a workload's pod template, for its owner objects.
func podTemplate(app string) corev1.PodTemplateSpec {
	return corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": app}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "public.ecr.aws/docker/library/busybox:1.37"}}}}
}

func ownedBy(kind, apiVersion, name string, uid types.UID) []metav1.OwnerReference {
	controller := true
	return []metav1.OwnerReference{{APIVersion: apiVersion, Kind: kind, Name: name, UID: uid, Controller: &controller}}
}

// TestECSSidecarNamesItsTask: a sidecar in an awsvpc task, given the task
// metadata endpoint by the ECS agent's variable, names a tokenless caller
// by the task (cluster, family:revision, ARN) and its container. The
// endpoint is a stand-in answering its documented JSON.
func TestECSSidecarNamesItsTask(t *testing.T) {
	const task = "0f9d7b1c2a3e4f5061728394a5b6c7d8"
	app := emulatedWorkload{name: "app", cgroup: "ecs/" + task + "/" + containerC, containerID: containerC}
	e := newSidecarEC2(t)
	app.ns = e.Task
	arn := "arn:aws:ecs:us-east-1:123456789012:task/prod/" + task
	endpoint := testutil.StartECSTaskMetadataStandIn(t, e.Task, "127.0.0.1:0", "prod", testutil.ECSTask{Arn: arn, Family: "billing", Revision: "7",
		Containers: []testutil.ECSContainer{
			{DockerID: containerD, Name: "imds-proxy", Addrs: []string{testutil.RoutedVeth.ContainerAddr}},
			{DockerID: containerC, Name: "app", Addrs: []string{testutil.RoutedVeth.ContainerAddr}},
		}})
	testutil.StartProxy(t, e.Task, binary, sidecarArgs("--iptables-backend", "nft"),
		testutil.WithEnv("ECS_CONTAINER_METADATA_URI_V4="+endpoint.URL))
	cgroups := testutil.NewCgroups(t)
	var row v1CallerRow
	waitFor(t, 10*time.Second, func() bool {
		if got := curlIn(t, cgroups, app, "/latest/meta-data/instance-id"); got != "200" {
			t.Fatalf("tokenless GET in the task: %s, want 200 (--v1 allow)", got)
		}
		status, body := e.Task.Get(t, "127.0.0.1:9169", "/v1-callers", nil)
		var rows []v1CallerRow
		if status != http.StatusOK || json.Unmarshal([]byte(body), &rows) != nil {
			t.Fatalf("/v1-callers: %d %s", status, body)
		}
		for _, r := range rows {
			if r.Workload != "" {
				row = r
				return true
			}
		}
		return false
	}, "the sidecar to name its task")
	if row.Platform != "ecs" || row.Namespace != "prod" || row.Workload != "billing:7" || row.Pod != arn || row.Container != "app" ||
		row.ContainerID != containerC || !strings.HasSuffix(row.Executable, "/curl") {
		t.Errorf("/v1-callers row %+v: want the task prod/billing:7 (%s), its container app (%s), curl", row, arn, containerC)
	}
}
