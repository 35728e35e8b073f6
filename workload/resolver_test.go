package workload

import (
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestResolverTracesInTheBackground: a node agent's resolver never scans
// /proc for Of, which only starts a trace in the background; the address's
// container and workload are known once it ends. Trace scans at once, for
// the rules that need the workload, or waits for Of's trace of the same
// address. The container is an ECS task's, in a network namespace of its
// own and a cgroup shaped like ECS's, named by the introspection source
// against the agent's stand-in.
func TestResolverTracesInTheBackground(t *testing.T) {
	const task = "8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"
	id := containerID("e")
	node, container := testutil.NewNetns(t), testutil.NewNetns(t)
	testutil.Veth(t, node, "veth1", "10.78.0.1/24", container, "eth0", "10.78.0.2/24")
	client, _ := testutil.NewCgroups(t).ConnectedApp(t, node, container, "10.78.0.1", "ecs/"+task+"/"+id)

	agent := testutil.StartECSIntrospectionStandIn(t, nil, "127.0.0.1:0", "prod", testutil.ECSTask{
		Arn: "arn:aws:ecs:us-east-1:111122223333:task/prod/" + task, Family: "billing", Revision: "7",
		Containers: []testutil.ECSContainer{{DockerID: id, DockerName: "ecs-billing-7-app", Name: "app"}}})
	log, _ := observed()
	ecs := NewECSIntrospection(agent.URL, nil, log)
	run(t, ecs)
	eventually(t, 10*time.Second, "the source never listed the task", func() bool { _, ok := lookup(ecs, id); return ok })

	want := attribution.Container{Runtime: "docker", ID: id, TaskID: task}
	background := NewNodeResolver(attribution.Attributor{}, time.Minute, 20, ecs)
	if c := background.Of(client); c.Traced || c.Workload.Known() {
		t.Fatalf("Of knew a caller it never traced: %+v", c)
	}
	eventually(t, 5*time.Second, "the background trace never ended", func() bool { return background.Of(client).Traced })
	if c := background.Of(client); c.Container != want || c.Workload.Name != "billing:7" || c.Workload.Container != "app" {
		t.Errorf("after the background trace: container %+v, workload %s container %q; want %+v, billing:7, app", c.Container, c.Workload, c.Workload.Container, want)
	}

	now := NewNodeResolver(attribution.Attributor{}, time.Minute, 20, ecs)
	if c := now.Trace(client); !c.Traced || c.Container != want || c.Workload.Name != "billing:7" {
		t.Errorf("Trace: %+v, want the task's container and workload at once", c)
	}

	// Trace right after Of waits for Of's background trace, and has its answer.
	both := NewNodeResolver(attribution.Attributor{}, time.Minute, 20, ecs)
	both.Of(client)
	if c := both.Trace(client); !c.Traced || c.Container != want {
		t.Errorf("Trace after Of: %+v, want the background trace's answer", c)
	}
}
