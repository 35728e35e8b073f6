package workload

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestDockerSource runs the Docker source against a real Docker engine
// (started in a namespace of the test's own) and the ECS introspection
// source against the agent's stand-in beside it: containers running before
// Run are known by name, image, imds-proxy.io/* labels and task role; one
// the ECS agent labelled is an ECS task's; one started later is found
// within seconds, and one removed is forgotten. No value of a container's
// environment reaches a workload or a log.
func TestDockerSource(t *testing.T) {
	node := testutil.NewNetns(t)
	d := testutil.StartDocker(t, node)
	d.BuildImage(t, "imdsp-busybox", nil)

	const secret = "/v2/credentials/6f1c9d2e-secret-guid"
	plain := d.RunOpts(t, []string{"--name", "plain", "--label", V1Key + "=block", "--label", "team=payments"},
		"imdsp-busybox", "sleep", "3600")
	taskARN := "arn:aws:ecs:us-east-1:111122223333:task/prod/0123456789abcdef0123456789abcdef"
	ecsOpts := []string{"--name", "ecs-web-7-app-e4f0a1b2c3d4", "-e", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=" + secret,
		"--label", V1Key + "=warn"}
	for k, v := range map[string]string{
		"com.amazonaws.ecs.cluster":                 "prod",
		"com.amazonaws.ecs.task-arn":                taskARN,
		"com.amazonaws.ecs.task-definition-family":  "web",
		"com.amazonaws.ecs.task-definition-version": "7",
		"com.amazonaws.ecs.container-name":          "app",
	} {
		ecsOpts = append(ecsOpts, "--label", k+"="+v)
	}
	ecsApp := d.RunOpts(t, ecsOpts, "imdsp-busybox", "sleep", "3600")

	log, logs := observed()
	src := NewDocker(d.Socket, log)
	run(t, src)

	eventually(t, 10*time.Second, "the containers running before Run are not found", func() bool {
		_, ok1 := lookup(src, plain)
		_, ok2 := lookup(src, ecsApp)
		return ok1 && ok2
	})
	got, _ := lookup(src, plain)
	want := Workload{Platform: "docker", Name: "plain", Container: "plain", Image: "imdsp-busybox", Settings: map[string]string{V1Key: "block"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("plain: %+v, want %+v", got, want)
	}
	if p, set, err := got.V1Policy(); !set || err != nil || p != "block" {
		t.Errorf("plain's V1Policy: %q, %v, %v", p, set, err)
	}
	if at, ok := src.LookupAddr(addressOf(t, d, plain)); !ok || at.Name != "plain" {
		t.Errorf("plain at its address on docker0: %+v, %v", at, ok)
	}
	got, _ = lookup(src, ecsApp)
	want = Workload{Platform: "ecs", Namespace: "prod", Name: "web:7", Pod: taskARN, Container: "app", Image: "imdsp-busybox",
		OwnIdentity: IdentityTaskRole, Settings: map[string]string{V1Key: "warn"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ECS app: %+v, want %+v", got, want)
	}

	t.Run("ECS introspection", func(t *testing.T) {
		// The agent knows the task; the Docker source tells its labels and role.
		agent := testutil.StartECSIntrospectionStandIn(t, nil, "127.0.0.1:0", "arn:aws:ecs:us-east-1:111122223333:cluster/prod",
			testutil.ECSTask{Arn: taskARN, Family: "web", Revision: "7", Containers: []testutil.ECSContainer{
				{DockerID: ecsApp, DockerName: "ecs-web-7-app-e4f0a1b2c3d4", Name: "app"},
			}})
		ecs := NewECSIntrospection(agent.URL, src, log)
		ecs.interval = pollInterval
		run(t, ecs)
		eventually(t, 5*time.Second, "the task's container is not found", func() bool { _, ok := lookup(ecs, ecsApp); return ok })
		got, _ := lookup(ecs, ecsApp)
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%+v, want %+v", got, want)
		}
		if w, ok := lookup(ecs, plain); ok {
			t.Errorf("a container of no task: %+v", w)
		}
	})

	start := time.Now()
	late := d.RunOpts(t, []string{"--name", "late", "--label", V1Key + "=allow"}, "imdsp-busybox", "sleep", "3600")
	eventually(t, 5*time.Second, "a container started after Run is not found", func() bool { _, ok := lookup(src, late); return ok })
	t.Logf("a container started after Run was found %s after docker run began", time.Since(start).Round(time.Millisecond))
	if got, _ := lookup(src, late); got.Name != "late" || got.Settings[V1Key] != "allow" || got.OwnIdentity != "" {
		t.Errorf("late: %+v", got)
	}
	lateAddr := addressOf(t, d, late)
	eventually(t, 5*time.Second, "a container started after Run is not found at its address", func() bool {
		w, ok := src.LookupAddr(lateAddr)
		return ok && w.Name == "late"
	})

	d.CLI(t, "stop", "-t", "1", late)
	d.CLI(t, "rm", late)
	eventually(t, 5*time.Second, "a container removed is still found", func() bool { _, ok := lookup(src, late); return !ok })
	if w, ok := src.LookupAddr(lateAddr); ok {
		t.Errorf("a container removed is still found at its address: %+v", w)
	}
	if _, ok := lookup(src, plain); !ok {
		t.Error("removing one container forgot another")
	}

	for _, e := range logs.All() {
		if strings.Contains(fmt.Sprint(e.Message, e.ContextMap()), secret) {
			t.Errorf("a log holds the container's credentials URI: %v", e)
		}
	}
	for _, id := range []string{plain, ecsApp} {
		if w, _ := lookup(src, id); strings.Contains(fmt.Sprintf("%#v", w), secret) {
			t.Errorf("a workload holds the container's credentials URI: %#v", w)
		}
	}
	if n := logs.FilterMessageSnippet("unavailable").Len(); n != 0 {
		t.Errorf("the engine was reported unavailable: %v", logs.All())
	}
}

// addressOf is container id's address on Docker's default network.
func addressOf(t *testing.T, d *testutil.Docker, id string) netip.Addr {
	t.Helper()
	addr, err := netip.ParseAddr(strings.TrimSpace(d.CLI(t, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", id)))
	if err != nil {
		t.Fatalf("container %s's address: %v", id, err)
	}
	return addr
}
