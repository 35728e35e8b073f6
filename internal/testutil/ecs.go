package testutil

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
)

// The ECS agent's task credential endpoint as containers in bridge mode
// reach it, and what the stand-in answers there.
const (
	ECSCredentialsAddr  = "169.254.170.2:80"
	ECSCredentialsPath  = "/v2/credentials/6f1c9d2e-task-role"
	ECSStandInAccessKey = "ASIAECSSTANDIN"
)

// StartECSAgentStandIn wires node the way ecs-init does for bridge-mode
// tasks and answers there. It is a stand-in for the ECS agent, which cannot
// run here: it serves only the credential path, in the agent's documented
// JSON shape, on 127.0.0.1:51679. The wiring is ecs-init's own: a nat
// PREROUTING DNAT of 169.254.170.2:80 to 127.0.0.1:51679, the OUTPUT
// REDIRECT for the host, and route_localnet on docker0 (without which the
// kernel drops packets routed to 127.0.0.1 from another interface).
func StartECSAgentStandIn(t testing.TB, node *Netns) {
	t.Helper()
	node.Run(t, "sysctl", "-qw", "net.ipv4.conf.docker0.route_localnet=1")
	node.Run(t, "iptables-nft", "-t", "nat", "-A", "PREROUTING", "-d", "169.254.170.2/32", "-p", "tcp", "-m", "tcp",
		"--dport", "80", "-j", "DNAT", "--to-destination", "127.0.0.1:51679")
	node.Run(t, "iptables-nft", "-t", "nat", "-A", "OUTPUT", "-d", "169.254.170.2/32", "-p", "tcp", "-m", "tcp",
		"--dport", "80", "-j", "REDIRECT", "--to-ports", "51679")
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+ECSCredentialsPath, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"RoleArn":"arn:aws:iam::111122223333:role/task-role","AccessKeyId":%q,`+
			`"SecretAccessKey":"stand-in-secret","Token":"stand-in-token","Expiration":"2030-01-01T00:00:00Z"}`, ECSStandInAccessKey)
	})
	serveECS(t, "ECS agent stand-in", node, "127.0.0.1:51679", mux)
}

// ECSTask is a task as the ECS stand-ins below serve it.
type ECSTask struct {
	Arn    string
	Family string
	// Revision is the task definition's revision: the introspection API's
	// Version, the task metadata endpoint's Revision.
	Revision    string
	KnownStatus string // RUNNING if ""
	Containers  []ECSContainer
}

// ECSContainer is a container of an ECSTask.
type ECSContainer struct {
	DockerID   string
	DockerName string
	Name       string
	Image      string
	Labels     map[string]string // the task metadata endpoint's only
	// Addrs are the task ENI's addresses (awsvpc), which the task metadata
	// endpoint lists under each container's Networks.
	Addrs []string
}

// ecsStandIn is what both ECS stand-ins share: a loopback or namespace
// listener, the tasks the test set, and whether to answer at all.
type ecsStandIn struct {
	// URL is where the stand-in answers: http://ADDR.
	URL string

	mu      sync.Mutex
	cluster string
	tasks   []ECSTask
	down    bool
}

// SetTasks replaces the tasks the stand-in serves.
func (s *ecsStandIn) SetTasks(tasks ...ECSTask) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tasks = append([]ECSTask(nil), tasks...)
}

// SetDown makes the stand-in answer 503 Service Unavailable to everything
// (down) or answer again.
func (s *ecsStandIn) SetDown(down bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = down
}

func (s *ecsStandIn) snapshot() (cluster string, tasks []ECSTask, down bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cluster, append([]ECSTask(nil), s.tasks...), s.down
}

func (s *ecsStandIn) handle(mux *http.ServeMux, pattern string, answer func(cluster string, tasks []ECSTask) any) {
	mux.HandleFunc("GET "+pattern, func(w http.ResponseWriter, _ *http.Request) {
		cluster, tasks, down := s.snapshot()
		if down {
			http.Error(w, "stand-in is down", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(answer(cluster, tasks))
	})
}

// serveECS listens on addr inside node, or in the test's own namespace on a
// loopback address when node is nil, and serves mux until the test ends.
func serveECS(t testing.TB, what string, node *Netns, addr string, mux *http.ServeMux) string {
	t.Helper()
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if ip := net.ParseIP(host); node == nil && (ip == nil || !ip.IsLoopback()) {
		t.Fatalf("%s: %s is not a loopback address; give a namespace of the test's own", what, addr)
	}
	var ln net.Listener
	if node != nil {
		node.Do(t, func() { ln, err = net.Listen("tcp", addr) })
	} else {
		ln, err = net.Listen("tcp", addr)
	}
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	srv := &http.Server{Handler: mux}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("%s: %v", what, err)
		}
	})
	return "http://" + ln.Addr().String()
}

func knownStatus(t ECSTask) string {
	if t.KnownStatus == "" {
		return "RUNNING"
	}
	return t.KnownStatus
}

// ECSIntrospectionStandIn is a stand-in for the ECS agent's introspection
// API (http://localhost:51678 on a container instance), which cannot run
// here. It serves GET /v1/metadata and GET /v1/tasks in the agent's JSON
// shapes (amazon-ecs-agent, agent/handlers/v1/response.go: MetadataResponse,
// TasksResponse), the tasks being those the test sets.
type ECSIntrospectionStandIn struct{ ecsStandIn }

// StartECSIntrospectionStandIn serves the stand-in on addr ("127.0.0.1:0"
// picks a port) inside node, or on loopback in the test's own namespace
// when node is nil, for the cluster named cluster, until the test ends.
func StartECSIntrospectionStandIn(t testing.TB, node *Netns, addr, cluster string, tasks ...ECSTask) *ECSIntrospectionStandIn {
	t.Helper()
	s := &ECSIntrospectionStandIn{ecsStandIn{cluster: cluster}}
	s.SetTasks(tasks...)
	mux := http.NewServeMux()
	s.handle(mux, "/v1/metadata", func(cluster string, _ []ECSTask) any {
		return map[string]any{
			"Cluster":              cluster,
			"ContainerInstanceArn": "arn:aws:ecs:us-east-1:111122223333:container-instance/" + cluster + "/0123456789abcdef0123456789abcdef",
			"Version":              "Amazon ECS Agent - v1.0.0 (imds-proxy test stand-in)",
		}
	})
	s.handle(mux, "/v1/tasks", func(_ string, tasks []ECSTask) any {
		type container struct {
			DockerID   string `json:"DockerId"`
			DockerName string `json:"DockerName"`
			Name       string `json:"Name"`
		}
		type task struct {
			Arn           string      `json:"Arn"`
			DesiredStatus string      `json:"DesiredStatus,omitempty"`
			KnownStatus   string      `json:"KnownStatus"`
			Family        string      `json:"Family"`
			Version       string      `json:"Version"`
			Containers    []container `json:"Containers"`
		}
		out := struct {
			Tasks []task `json:"Tasks"`
		}{Tasks: []task{}}
		for _, t := range tasks {
			tk := task{Arn: t.Arn, DesiredStatus: "RUNNING", KnownStatus: knownStatus(t), Family: t.Family, Version: t.Revision, Containers: []container{}}
			for _, c := range t.Containers {
				tk.Containers = append(tk.Containers, container{DockerID: c.DockerID, DockerName: c.DockerName, Name: c.Name})
			}
			out.Tasks = append(out.Tasks, tk)
		}
		return out
	})
	s.URL = serveECS(t, "ECS introspection stand-in", node, addr, mux)
	return s
}

// ECSTaskMetadataStandIn is a stand-in for the ECS task metadata endpoint
// v4 of one task, which only the ECS agent serves. It answers GET
// {URL}/task in the endpoint's documented JSON shape (Cluster, TaskARN,
// Family, Revision, DesiredStatus, KnownStatus, Containers[] with DockerId,
// Name, DockerName, Image, Labels, ...), for the task the test sets.
type ECSTaskMetadataStandIn struct{ ecsStandIn }

// StartECSTaskMetadataStandIn serves the stand-in on addr inside node, or on
// loopback in the test's own namespace when node is nil, until the test
// ends. Its URL is what ECS_CONTAINER_METADATA_URI_V4 would hold.
func StartECSTaskMetadataStandIn(t testing.TB, node *Netns, addr, cluster string, task ECSTask) *ECSTaskMetadataStandIn {
	t.Helper()
	s := &ECSTaskMetadataStandIn{ecsStandIn{cluster: cluster}}
	s.SetTask(task)
	const prefix = "/v4/0f9d7b1c2a3e4f5061728394a5b6c7d8-1234567890"
	mux := http.NewServeMux()
	s.handle(mux, prefix+"/task", func(cluster string, tasks []ECSTask) any {
		type network struct {
			NetworkMode   string   `json:"NetworkMode"`
			IPv4Addresses []string `json:"IPv4Addresses"`
		}
		type container struct {
			DockerID      string            `json:"DockerId"`
			Name          string            `json:"Name"`
			DockerName    string            `json:"DockerName"`
			Image         string            `json:"Image"`
			ImageID       string            `json:"ImageID"`
			Labels        map[string]string `json:"Labels"`
			DesiredStatus string            `json:"DesiredStatus"`
			KnownStatus   string            `json:"KnownStatus"`
			Type          string            `json:"Type"`
			Networks      []network         `json:"Networks"`
		}
		var t ECSTask
		if len(tasks) > 0 {
			t = tasks[0]
		}
		out := struct {
			Cluster       string      `json:"Cluster"`
			TaskARN       string      `json:"TaskARN"`
			Family        string      `json:"Family"`
			Revision      string      `json:"Revision"`
			DesiredStatus string      `json:"DesiredStatus"`
			KnownStatus   string      `json:"KnownStatus"`
			LaunchType    string      `json:"LaunchType"`
			Containers    []container `json:"Containers"`
		}{Cluster: cluster, TaskARN: t.Arn, Family: t.Family, Revision: t.Revision, DesiredStatus: "RUNNING",
			KnownStatus: knownStatus(t), LaunchType: "EC2", Containers: []container{}}
		for _, c := range t.Containers {
			labels := map[string]string{
				"com.amazonaws.ecs.cluster":                 cluster,
				"com.amazonaws.ecs.container-name":          c.Name,
				"com.amazonaws.ecs.task-arn":                t.Arn,
				"com.amazonaws.ecs.task-definition-family":  t.Family,
				"com.amazonaws.ecs.task-definition-version": t.Revision,
			}
			for k, v := range c.Labels {
				labels[k] = v
			}
			out.Containers = append(out.Containers, container{DockerID: c.DockerID, Name: c.Name, DockerName: c.DockerName,
				Image: c.Image, ImageID: "sha256:" + strings.Repeat("0", 64), Labels: labels,
				DesiredStatus: "RUNNING", KnownStatus: knownStatus(t), Type: "NORMAL",
				Networks: []network{{NetworkMode: "awsvpc", IPv4Addresses: c.Addrs}}})
		}
		return out
	})
	s.URL = serveECS(t, "ECS task metadata stand-in", node, addr, mux) + prefix
	return s
}

// SetTask replaces the task the stand-in serves.
func (s *ECSTaskMetadataStandIn) SetTask(task ECSTask) { s.SetTasks(task) }
