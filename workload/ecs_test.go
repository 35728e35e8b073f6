package workload

import (
	"context"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// pollInterval is how often the tests' sources poll their stand-ins.
const pollInterval = 100 * time.Millisecond

// containerID is a Docker ID made of one repeated hex digit.
func containerID(digit string) string { return strings.Repeat(digit, 64) }

// eventually waits up to timeout for cond, failing the test with what
// otherwise.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// run runs src until the test ends.
func run(t *testing.T, src Source) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); src.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Run did not return within 10s of its context ending")
		}
	})
}

func observed() (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zap.DebugLevel)
	return zap.New(core), logs
}

func lookup(src Source, id string) (Workload, bool) {
	return src.Lookup(attribution.Container{Runtime: "docker", ID: id})
}

// TestECSIntrospection: the source follows the agent's task list (a task
// added is found, one stopped or gone is forgotten), names workloads by
// cluster, task definition, task ARN and container name, keeps what it
// knows while the agent does not answer (logged once) and picks up again.
func TestECSIntrospection(t *testing.T) {
	web := testutil.ECSTask{
		Arn:    "arn:aws:ecs:us-east-1:111122223333:task/prod/0123456789abcdef0123456789abcdef",
		Family: "web", Revision: "7",
		Containers: []testutil.ECSContainer{
			{DockerID: containerID("a"), DockerName: "ecs-web-7-app-aaaa", Name: "app"},
			{DockerID: containerID("b"), DockerName: "ecs-web-7-log-bbbb", Name: "log-router"},
			{Name: "pending"}, // not created yet: no Docker ID
		},
	}
	agent := testutil.StartECSIntrospectionStandIn(t, nil, "127.0.0.1:0", "prod", web)
	log, logs := observed()
	src := NewECSIntrospection(agent.URL, nil, log)
	src.interval = pollInterval
	run(t, src)

	eventually(t, 5*time.Second, "the task's container is not found", func() bool { _, ok := lookup(src, containerID("a")); return ok })
	got, _ := lookup(src, containerID("a"))
	want := Workload{Platform: "ecs", Namespace: "prod", Name: "web:7", Pod: web.Arn, Container: "app"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("container a: %+v, want %+v", got, want)
	}
	if got, _ := lookup(src, containerID("b")); got.Container != "log-router" || got.Name != "web:7" {
		t.Errorf("container b: %+v", got)
	}
	if w, ok := src.Lookup(attribution.Container{}); ok {
		t.Errorf("no ID: %+v", w)
	}
	if w, ok := lookup(src, containerID("c")); ok {
		t.Errorf("a container of no task: %+v", w)
	}

	worker := testutil.ECSTask{
		Arn:    "arn:aws:ecs:us-east-1:111122223333:task/prod/fedcba9876543210fedcba9876543210",
		Family: "worker", Revision: "3",
		Containers: []testutil.ECSContainer{{DockerID: containerID("c"), DockerName: "ecs-worker-3-main-cccc", Name: "main"}},
	}
	agent.SetTasks(web, worker)
	eventually(t, 5*time.Second, "a task added is not found", func() bool {
		w, ok := lookup(src, containerID("c"))
		return ok && w.Name == "worker:3" && w.Container == "main"
	})

	stopped := web
	stopped.KnownStatus = "STOPPED"
	agent.SetTasks(stopped, worker)
	eventually(t, 5*time.Second, "a stopped task's container is still found", func() bool { _, ok := lookup(src, containerID("a")); return !ok })

	agent.SetDown(true)
	time.Sleep(10 * pollInterval)
	if _, ok := lookup(src, containerID("c")); !ok {
		t.Error("the agent stopped answering and what was known is forgotten")
	}
	if n := logs.FilterMessageSnippet("unavailable").Len(); n != 1 {
		t.Errorf("%d logs of the agent unavailable over 10 failed polls, want 1: %v", n, logs.All())
	}
	agent.SetDown(false)
	agent.SetTasks(worker)
	eventually(t, 5*time.Second, "the agent answers again, and the source does not follow", func() bool { _, ok := lookup(src, containerID("b")); return !ok })
	eventually(t, time.Second, "the agent back is not logged", func() bool { return logs.FilterMessageSnippet("available again").Len() == 1 })
}

// TestECSIntrospectionUnreachable: an agent that never answers leaves the
// source knowing nothing, logged once with the URL.
func TestECSIntrospectionUnreachable(t *testing.T) {
	agent := testutil.StartECSIntrospectionStandIn(t, nil, "127.0.0.1:0", "prod")
	agent.SetDown(true)
	log, logs := observed()
	src := NewECSIntrospection(agent.URL, nil, log)
	src.interval = pollInterval
	run(t, src)
	time.Sleep(10 * pollInterval)
	entries := logs.FilterMessageSnippet("unavailable").All()
	if len(entries) != 1 {
		t.Fatalf("%d logs, want 1: %v", len(entries), logs.All())
	}
	if url := entries[0].ContextMap()["url"]; url != agent.URL {
		t.Errorf("logged url %v, want %s", url, agent.URL)
	}
	if _, ok := lookup(src, containerID("a")); ok {
		t.Error("found a container")
	}
}

// TestClusterName: an ECS cluster given as an ARN is named by its short
// name, as the agent's configuration usually gives it.
func TestClusterName(t *testing.T) {
	for in, want := range map[string]string{
		"prod": "prod",
		"arn:aws:ecs:us-west-2:111122223333:cluster/prod":  "prod",
		"arn:aws-cn:ecs:cn-north-1:111122223333:cluster/x": "x",
		"": "",
	} {
		if got := clusterName(in); got != want {
			t.Errorf("clusterName(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestECSTaskMetadata: the sidecar's source knows its task's containers
// from the task metadata endpoint v4, with their imds-proxy.io/* labels as
// Settings, and follows containers that start later.
func TestECSTaskMetadata(t *testing.T) {
	task := testutil.ECSTask{
		Arn:    "arn:aws:ecs:us-east-1:111122223333:task/prod/0123456789abcdef0123456789abcdef",
		Family: "api", Revision: "12",
		Containers: []testutil.ECSContainer{
			{DockerID: containerID("a"), Name: "imds-proxy", Image: "ghcr.io/imds-proxy/imds-proxy:0.1.0", Addrs: []string{"10.0.7.41"}},
			{DockerID: containerID("b"), Name: "app", Image: "111122223333.dkr.ecr.us-east-1.amazonaws.com/api:1",
				Labels: map[string]string{V1Key: "block", "team": "payments"}, Addrs: []string{"10.0.7.41"}},
		},
	}
	endpoint := testutil.StartECSTaskMetadataStandIn(t, nil, "127.0.0.1:0", "arn:aws:ecs:us-east-1:111122223333:cluster/prod", task)
	log, logs := observed()
	src := NewECSTaskMetadata(endpoint.URL, log)
	src.interval = pollInterval
	run(t, src)

	eventually(t, 5*time.Second, "the app container is not found", func() bool { _, ok := lookup(src, containerID("b")); return ok })
	got, _ := lookup(src, containerID("b"))
	want := Workload{Platform: "ecs", Namespace: "prod", Name: "api:12", Pod: task.Arn, Container: "app",
		Image: "111122223333.dkr.ecr.us-east-1.amazonaws.com/api:1", Settings: map[string]string{V1Key: "block"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("app: %+v, want %+v", got, want)
	}
	if p, set, err := got.V1Policy(); !set || err != nil || p != "block" {
		t.Errorf("app's V1Policy: %q, %v, %v", p, set, err)
	}
	if got, _ := lookup(src, containerID("a")); got.Container != "imds-proxy" || got.Settings != nil {
		t.Errorf("sidecar: %+v", got)
	}
	// A caller redirected to the sidecar comes from the task ENI's address.
	if got, ok := src.LookupAddr(netip.MustParseAddr("10.0.7.41")); !ok ||
		!reflect.DeepEqual(got, Workload{Platform: "ecs", Namespace: "prod", Name: "api:12", Pod: task.Arn}) {
		t.Errorf("at the task's address: %+v, %v; want the task, without a container", got, ok)
	}
	if got, ok := src.LookupAddr(netip.MustParseAddr("127.0.0.1")); ok {
		t.Errorf("at loopback: %+v, want no workload", got)
	}

	task.Containers = append(task.Containers, testutil.ECSContainer{DockerID: containerID("c"), Name: "late", Image: "busybox"})
	endpoint.SetTask(task)
	eventually(t, 5*time.Second, "a container started later is not found", func() bool { _, ok := lookup(src, containerID("c")); return ok })

	endpoint.SetDown(true)
	time.Sleep(10 * pollInterval)
	if _, ok := lookup(src, containerID("c")); !ok {
		t.Error("the endpoint stopped answering and what was known is forgotten")
	}
	if n := logs.FilterMessageSnippet("unavailable").Len(); n != 1 {
		t.Errorf("%d logs of the endpoint unavailable, want 1: %v", n, logs.All())
	}
}
