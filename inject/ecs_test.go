package inject

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/ecs"
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
