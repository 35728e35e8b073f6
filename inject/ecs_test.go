package inject

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/ecs"
	"github.com/google/go-cmp/cmp"
	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// decodeTaskDefinition decodes a task definition strictly into the AWS SDK
// for Go v2 RegisterTaskDefinition input, as the CLI would send it.
func decodeTaskDefinition(t *testing.T, data []byte) ecs.RegisterTaskDefinitionInput {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var in ecs.RegisterTaskDefinitionInput
	if err := dec.Decode(&in); err != nil {
		t.Fatalf("task definition does not decode strictly into ecs.RegisterTaskDefinitionInput: %v\n%s", err, data)
	}
	return in
}

// TestECSTaskDefinition injects an awsvpc task definition: golden output,
// the sidecar first, every other container waiting for it to be HEALTHY
// (existing dependencies kept), keys in their original order, and a second
// injection changing nothing.
func TestECSTaskDefinition(t *testing.T) {
	in, err := os.ReadFile("testdata/ecs/awsvpc.json")
	if err != nil {
		t.Fatal(err)
	}
	out, err := ECSTaskDefinition(in, DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "ecs/golden/awsvpc.json", out)

	task := decodeTaskDefinition(t, out)
	sidecar := task.ContainerDefinitions[0]
	if *sidecar.Name != ContainerName || sidecar.HealthCheck == nil || *sidecar.User != "0" ||
		strings.Join(sidecar.LinuxParameters.Capabilities.Add, ",") != "NET_ADMIN,NET_RAW" {
		t.Errorf("sidecar definition: %+v", sidecar)
	}
	want := map[string][]string{"web": {"migrate:SUCCESS", "imds-proxy:HEALTHY"}, "migrate": {"imds-proxy:HEALTHY"}}
	for _, c := range task.ContainerDefinitions[1:] {
		var got []string
		for _, d := range c.DependsOn {
			got = append(got, *d.ContainerName+":"+string(d.Condition))
		}
		if strings.Join(got, ",") != strings.Join(want[*c.Name], ",") {
			t.Errorf("%s dependsOn %v, want %v", *c.Name, got, want[*c.Name])
		}
	}
	var before, after object
	_ = json.Unmarshal(in, &before)
	_ = json.Unmarshal(out, &after)
	if keys(before) != keys(after) {
		t.Errorf("key order changed: %s became %s", keys(before), keys(after))
	}
	again, err := ECSTaskDefinition(out, DefaultOptions())
	if err != nil || !bytes.Equal(again, out) {
		t.Errorf("injecting twice changed the task definition (err %v)", err)
	}
}

func keys(o object) string {
	var k []string
	for _, m := range o {
		k = append(k, m.key)
	}
	return strings.Join(k, ",")
}

// TestECSRefusals: task definitions a sidecar cannot serve get an error
// that says what to do instead.
func TestECSRefusals(t *testing.T) {
	cases := []struct{ name, in, want string }{
		{"bridge", `{"family":"x","networkMode":"bridge","containerDefinitions":[{"name":"a"}]}`, "networkMode is bridge"},
		{"default", `{"family":"x","containerDefinitions":[{"name":"a"}]}`, "networkMode is bridge (the default)"},
		{"host", `{"family":"x","networkMode":"host","containerDefinitions":[{"name":"a"}]}`, "imds-proxy node"},
		{"not JSON", `{"family":`, "task definition:"},
		{"array", `[]`, "expected a JSON object"},
		{"no containers", `{"networkMode":"awsvpc"}`, "containerDefinitions is missing"},
		{"empty containers", `{"networkMode":"awsvpc","containerDefinitions":[]}`, "containerDefinitions is empty"},
		{"bad container", `{"networkMode":"awsvpc","containerDefinitions":[3]}`, "containerDefinitions"},
		{"Fargate", `{"networkMode":"awsvpc","requiresCompatibilities":["EC2","FARGATE"],"containerDefinitions":[{"name":"a"}]}`, "FARGATE"},
		{"bad dependsOn", `{"networkMode":"awsvpc","containerDefinitions":[{"name":"a","dependsOn":"x"}]}`, "dependsOn"},
	}
	for _, c := range cases {
		if _, err := ECSTaskDefinition([]byte(c.in), DefaultOptions()); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want it to contain %q", c.name, err, c.want)
		}
	}
}

// TestECSSidecarOptions: the options reach the container definition.
func TestECSSidecarOptions(t *testing.T) {
	o := Options{Image: "registry.example/imds-proxy:9", Port: 18169, MetricsPort: 19169, V1: "block", Upstream: "http://172.17.0.1:8169"}
	out, err := ECSTaskDefinition([]byte(`{"networkMode":"awsvpc","containerDefinitions":[{"name":"a","image":"b"}]}`), o)
	if err != nil {
		t.Fatal(err)
	}
	c := decodeTaskDefinition(t, out).ContainerDefinitions[0]
	args := strings.Join(c.Command, " ")
	if *c.Image != o.Image || args != "sidecar --listen=127.0.0.1:18169 --metrics-listen=127.0.0.1:19169 --v1=block --upstream=http://172.17.0.1:8169" {
		t.Errorf("image %s, command %q", *c.Image, args)
	}
	if hc := strings.Join(c.HealthCheck.Command, " "); !strings.Contains(hc, "--url=http://127.0.0.1:19169/readyz") {
		t.Errorf("health check %q does not probe the metrics port", hc)
	}
}

// TestECSPolicy: a task definition's own sidecar is kept only if it is
// exactly the one ECS adds (empty fields, as describe-task-definition
// prints them, aside), its --v1 raised to the floor and every container
// made to wait for it; any other container of its name is a violation.
func TestECSPolicy(t *testing.T) {
	const app = `{"networkMode":"awsvpc","containerDefinitions":[{"name":"a","image":"b"}]}`
	opts := DefaultOptions()
	opts.V1 = imdsapi.V1Allow
	allow, _, err := ECS([]byte(app), opts)
	if err != nil {
		t.Fatal(err)
	}
	floor := DefaultOptions()
	floor.Policy.V1Floor = imdsapi.V1Block
	out, notes, err := ECS(allow, floor)
	if err != nil || len(notes) != 1 || !strings.Contains(notes[0], "--v1=allow is looser than the floor") {
		t.Fatalf("raising a sidecar with --v1=allow: notes %q, err %v", notes, err)
	}
	if args := strings.Join(decodeTaskDefinition(t, out).ContainerDefinitions[0].Command, " "); !strings.Contains(args, "--v1=block") || strings.Contains(args, "--v1=allow") {
		t.Errorf("raised sidecar's command %q, want --v1=block", args)
	}
	if again, notes, err := ECS(out, floor); err != nil || len(notes) != 0 || !bytes.Equal(again, out) {
		t.Errorf("a raised task definition is changed again (notes %q, err %v)", notes, err)
	}

	var task map[string]any
	_ = json.Unmarshal(allow, &task)
	containers := task["containerDefinitions"].([]any)
	sidecar, other := containers[0].(map[string]any), containers[1].(map[string]any)
	for k, v := range map[string]any{"cpu": 0, "portMappings": []any{}, "environment": []any{}, "mountPoints": []any{}, "volumesFrom": []any{}} {
		sidecar[k] = v // as describe-task-definition prints them
	}
	delete(other, "dependsOn")
	described, _ := json.Marshal(task)
	out, _, err = ECS(described, DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	if deps := decodeTaskDefinition(t, out).ContainerDefinitions[1].DependsOn; len(deps) != 1 || *deps[0].ContainerName != ContainerName {
		t.Errorf("a container that did not wait for the kept sidecar: dependsOn %+v", deps)
	}

	sidecar["environment"] = []any{map[string]any{"name": "IMDS_PROXY_RULES", "value": "false"}}
	tampered, _ := json.Marshal(task)
	decoys := map[string][]byte{
		"busybox":     []byte(`{"networkMode":"awsvpc","containerDefinitions":[{"name":"imds-proxy","image":"busybox"},{"name":"a","image":"b"}]}`),
		"environment": tampered,
	}
	for name, in := range decoys {
		out, notes, err := ECS(in, floor)
		if err != nil || !bytes.Equal(out, in) || len(notes) != 1 || !strings.Contains(notes[0], "is not the sidecar") {
			t.Errorf("%s, --on-violation=warn: unchanged %t, notes %q, err %v; want it unchanged with a note", name, bytes.Equal(out, in), notes, err)
		}
		floor.Policy.OnViolation = Deny
		if _, _, err := ECS(in, floor); err == nil || !strings.Contains(err.Error(), "refused") {
			t.Errorf("%s, --on-violation=deny: %v, want a refusal", name, err)
		}
		floor.Policy.OnViolation = Warn
		if _, err := ECSTaskDefinition(in, DefaultOptions()); err == nil {
			t.Errorf("%s: ECSTaskDefinition, with nowhere to put a note, accepted it", name)
		}
	}
}

// TestECSBypasses: a container that could get around the sidecar (one that
// is privileged or adds NET_ADMIN, or any, where the task shares a PID
// namespace) is noted, the sidecar added or kept all the same, and with
// --on-violation=deny the task definition is refused; the sidecar's own
// NET_ADMIN is no finding.
func TestECSBypasses(t *testing.T) {
	injected, err := os.ReadFile("testdata/ecs/golden/awsvpc.json")
	if err != nil {
		t.Fatal(err)
	}
	var task map[string]any
	_ = json.Unmarshal(injected, &task)
	task["containerDefinitions"].([]any)[1].(map[string]any)["privileged"] = true
	keptPrivileged, _ := json.Marshal(task)
	cases := []struct {
		name, in, says string
	}{
		{"privileged", `{"networkMode":"awsvpc","containerDefinitions":[{"name":"a","image":"b","privileged":true}]}`, "container a is privileged"},
		{"NET_ADMIN", `{"networkMode":"awsvpc","containerDefinitions":[{"name":"a","image":"b","linuxParameters":{"capabilities":{"add":["SYS_TIME","NET_ADMIN"]}}}]}`, "container a adds NET_ADMIN"},
		{"CAP_NET_ADMIN", `{"networkMode":"awsvpc","containerDefinitions":[{"name":"a","image":"b","linuxParameters":{"capabilities":{"add":["CAP_NET_ADMIN"]}}}]}`, "container a adds NET_ADMIN"},
		{"pidMode task", `{"networkMode":"awsvpc","pidMode":"task","containerDefinitions":[{"name":"a","image":"b"}]}`, "pidMode task"},
		{"kept sidecar", string(keptPrivileged), "container web is privileged"},
	}
	for _, c := range cases {
		warn := DefaultOptions()
		out, notes, err := ECS([]byte(c.in), warn)
		if err != nil || !strings.Contains(strings.Join(notes, "\n"), c.says) {
			t.Errorf("%s, --on-violation=warn: notes %q, err %v; want a note saying %q", c.name, notes, err, c.says)
		} else if first := decodeTaskDefinition(t, out).ContainerDefinitions[0]; *first.Name != ContainerName {
			t.Errorf("%s, --on-violation=warn: first container %s, want the sidecar", c.name, *first.Name)
		}
		deny := DefaultOptions()
		deny.Policy.OnViolation = Deny
		if _, _, err := ECS([]byte(c.in), deny); err == nil || !strings.Contains(err.Error(), "refused (--on-violation=deny)") || !strings.Contains(err.Error(), c.says) {
			t.Errorf("%s, --on-violation=deny: %v, want a refusal saying %q", c.name, err, c.says)
		}
		if _, err := ECSTaskDefinition([]byte(c.in), DefaultOptions()); err == nil {
			t.Errorf("%s: ECSTaskDefinition, with nowhere to put a note, accepted it", c.name)
		}
	}
	if _, notes, err := ECS(injected, DefaultOptions()); err != nil || len(notes) != 0 {
		t.Errorf("the injected example: notes %q, err %v; want neither (the sidecar's own NET_ADMIN is no bypass)", notes, err)
	}
}

// TestECSWorkloadRole: --credentials workload gives the sidecar the
// workload-role build and the task definition's taskRoleArn, refuses a task
// definition without one, and a second injection changes nothing.
func TestECSWorkloadRole(t *testing.T) {
	o := DefaultOptions()
	o.Credentials = imdsapi.CredentialsWorkload
	in, err := os.ReadFile("testdata/ecs/awsvpc.json")
	if err != nil {
		t.Fatal(err)
	}
	out, _, err := ECS(in, o)
	if err != nil {
		t.Fatal(err)
	}
	c := decodeTaskDefinition(t, out).ContainerDefinitions[0]
	args := strings.Join(c.Command, " ")
	if strings.Join(c.EntryPoint, " ") != WorkloadRoleCommand ||
		!strings.HasSuffix(args, "--credentials=workload --workload-role-arn=arn:aws:iam::111122223333:role/shop") {
		t.Errorf("entryPoint %q, command %q: want %s with the task role", c.EntryPoint, args, WorkloadRoleCommand)
	}
	again, _, err := ECS(out, o)
	if err != nil || !bytes.Equal(again, out) {
		t.Errorf("injecting twice: %v\n%s", err, cmp.Diff(string(out), string(again)))
	}
	if _, _, err := ECS([]byte(`{"networkMode":"awsvpc","containerDefinitions":[{"name":"a","image":"b"}]}`), o); err == nil ||
		!strings.Contains(err.Error(), "no taskRoleArn") {
		t.Errorf("a task definition without a task role: %v, want it refused", err)
	}
	// A task definition whose sidecar serves the instance's role keeps it,
	// and a note says it is not the one asked for; none when it is.
	instance, notes, err := ECS(in, DefaultOptions())
	if err != nil || len(notes) != 0 {
		t.Fatalf("instance sidecar: %v %v", notes, err)
	}
	kept, notes, err := ECS(instance, o)
	if err != nil || !bytes.Equal(kept, instance) || len(notes) != 1 || !strings.Contains(notes[0], "not the one asked for") {
		t.Errorf("asking for the workload role of a task definition with an instance sidecar: notes %q, %v", notes, err)
	}
	if _, notes, _ := ECS(out, o); len(notes) != 0 {
		t.Errorf("the workload-role sidecar asked for again: notes %q, want none", notes)
	}
}
