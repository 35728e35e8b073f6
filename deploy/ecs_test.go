package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/aws/aws-sdk-go-v2/service/ecs"
	ecstypes "github.com/aws/aws-sdk-go-v2/service/ecs/types"

	"github.com/imds-proxy/imds-proxy/inject"
)

// ecsFiles are the ECS CLI inputs and the SDK input each must decode into:
// what `aws ecs register-task-definition --cli-input-json` and
// `aws ecs create-service --cli-input-json` accept.
var ecsFiles = map[string]func() any{
	"app-task-definition.json":         func() any { return &ecs.RegisterTaskDefinitionInput{} },
	"sidecar-task-definition.json":     func() any { return &ecs.RegisterTaskDefinitionInput{} },
	"node-daemon-task-definition.json": func() any { return &ecs.RegisterTaskDefinitionInput{} },
	"node-daemon-service.json":         func() any { return &ecs.CreateServiceInput{} },
}

// decodeECSStrictly decodes one JSON value into v, rejecting unknown keys
// and trailing data, and then checks every key's exact spelling.
//
// encoding/json matches keys to the SDK's Go field names (the SDK types
// have no json tags) case-insensitively, so DisallowUnknownFields alone
// catches a misspelled key but not a miscapitalised one ("NetworkMode"),
// which the AWS CLI rejects. The SDK's field names are the API's member
// names with the first letter upper-cased, so keySpelling checks that.
func decodeECSStrictly(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("data after the JSON object")
	}
	var generic any
	if err := json.Unmarshal(data, &generic); err != nil {
		return err
	}
	return errors.Join(keySpelling("", generic, reflect.TypeOf(v))...)
}

// keySpelling walks a decoded JSON value beside the Go type it decoded
// into and reports every object key not spelled as the API spells it.
func keySpelling(at string, v any, t reflect.Type) []error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	var errs []error
	switch t.Kind() {
	case reflect.Struct:
		obj, ok := v.(map[string]any)
		if !ok {
			return nil // the decoder has already judged it
		}
		for key, value := range obj {
			f, ok := fieldFolding(t, key)
			if !ok {
				errs = append(errs, fmt.Errorf("%s%s: unknown key", at, key))
				continue
			}
			if want := lowerFirst(f.Name); key != want {
				errs = append(errs, fmt.Errorf("%s%s: the API spells it %q", at, key, want))
			}
			errs = append(errs, keySpelling(at+key+".", value, f.Type)...)
		}
	case reflect.Slice, reflect.Array:
		list, _ := v.([]any)
		for i, item := range list {
			errs = append(errs, keySpelling(fmt.Sprintf("%s%d.", at, i), item, t.Elem())...)
		}
	case reflect.Map:
		obj, _ := v.(map[string]any)
		for key, value := range obj { // free-form keys (labels, options)
			errs = append(errs, keySpelling(at+key+".", value, t.Elem())...)
		}
	}
	return errs
}

func fieldFolding(t reflect.Type, key string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		if f := t.Field(i); f.IsExported() && strings.EqualFold(f.Name, key) {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func lowerFirst(s string) string {
	r, n := utf8.DecodeRuneInString(s)
	return string(unicode.ToLower(r)) + s[n:]
}

func readECS(t *testing.T, name string, v any) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(ecsDir, name))
	if err != nil {
		t.Fatal(err)
	}
	if err := decodeECSStrictly(data, v); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return data
}

// TestECSDecodeStrictly: every JSON file under deploy/ecs is an ECS CLI
// input that decodes strictly into its AWS SDK for Go v2 input type, with
// every key spelled exactly as the API spells it.
func TestECSDecodeStrictly(t *testing.T) {
	entries, err := os.ReadDir(ecsDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if e.Name() != "README.md" {
			names = append(names, e.Name())
		}
	}
	if want := keys(ecsFiles); !slices.Equal(names, want) {
		t.Fatalf("%s holds %v; the test knows %v", ecsDir, names, want)
	}
	for _, name := range names {
		readECS(t, name, ecsFiles[name]())
	}
}

// TestECSStrictDecodingCatchesMistakes proves the decoding above is strict:
// a misspelled key, at the top or nested in a container definition, fails
// it although the lenient decoder accepts it; so do a miscapitalised key,
// which DisallowUnknownFields alone lets through, and trailing data.
func TestECSStrictDecodingCatchesMistakes(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(ecsDir, "sidecar-task-definition.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		key, bad     string
		lenientError bool // DisallowUnknownFields alone catches it
	}{
		{`"networkMode"`, `"netwrokMode"`, true},
		{`"healthCheck"`, `"healthChek"`, true},
		{`"startPeriod"`, `"startPeriods"`, true},
		{`"dependsOn"`, `"dependsOnn"`, true},
		{`"networkMode"`, `"NetworkMode"`, false},
		{`"memoryReservation"`, `"memoryreservation"`, false},
	} {
		if !bytes.Contains(data, []byte(c.key)) {
			t.Fatalf("no %s to misspell", c.key)
		}
		bad := bytes.Replace(data, []byte(c.key), []byte(c.bad), 1)
		if err := json.Unmarshal(bad, &ecs.RegisterTaskDefinitionInput{}); err != nil {
			t.Errorf("%s: the lenient decoder fails too (%v), so this proves nothing", c.bad, err)
		}
		dec := json.NewDecoder(bytes.NewReader(bad))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&ecs.RegisterTaskDefinitionInput{}); (err != nil) != c.lenientError {
			t.Errorf("%s: DisallowUnknownFields gave %v", c.bad, err)
		}
		err := decodeECSStrictly(bad, &ecs.RegisterTaskDefinitionInput{})
		if err == nil || !strings.Contains(err.Error(), strings.Trim(c.bad, `"`)) {
			t.Errorf("%s: strict decoding gave %v, want an error naming it", c.bad, err)
		}
	}
	if err := decodeECSStrictly(append(slices.Clone(data), "{}"...), &ecs.RegisterTaskDefinitionInput{}); err == nil {
		t.Error("trailing data decoded")
	}
}

func container(t *testing.T, task *ecs.RegisterTaskDefinitionInput, name string) ecstypes.ContainerDefinition {
	t.Helper()
	for _, c := range task.ContainerDefinitions {
		if deref(c.Name) == name {
			return c
		}
	}
	t.Fatalf("task definition %s has no container %q", deref(task.Family), name)
	return ecstypes.ContainerDefinition{}
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

// checkECSProxy: the container runs imds-proxy as root with only caps
// (sorted), and its health check asks the proxy's own admin listener.
func checkECSProxy(t *testing.T, where string, c ecstypes.ContainerDefinition, caps ...string) {
	t.Helper()
	checkImage(t, where, deref(c.Image))
	if !deref(c.Essential) || deref(c.User) != "0" {
		t.Errorf("%s: essential %v, user %q: want essential, root", where, deref(c.Essential), deref(c.User))
	}
	given := deref(deref(c.LinuxParameters).Capabilities)
	if got := slices.Sorted(slices.Values(given.Add)); !slices.Equal(got, caps) || !slices.Equal(given.Drop, []string{"ALL"}) {
		t.Errorf("%s: capabilities add %v drop %v: want %v; ALL", where, given.Add, given.Drop, caps)
	}
	if deref(c.Privileged) {
		t.Errorf("%s: privileged", where)
	}
	h := deref(c.HealthCheck)
	metrics, _ := flagValue(c.Command, "metrics-listen")
	want := []string{"CMD", "/usr/local/bin/imds-proxy", "ready", "--url=http://" + metrics + "/readyz"}
	if !slices.Equal(h.Command, want) {
		t.Errorf("%s: healthCheck command %q, want %q (the --metrics-listen of %q)", where, h.Command, want, c.Command)
	}
	if deref(h.Interval) != 5 || deref(h.Timeout) != 2 || deref(h.Retries) != 3 || deref(h.StartPeriod) != 10 {
		t.Errorf("%s: healthCheck interval %d, timeout %d, retries %d, startPeriod %d: want 5, 2, 3, 10",
			where, deref(h.Interval), deref(h.Timeout), deref(h.Retries), deref(h.StartPeriod))
	}
	if deref(c.MemoryReservation) != 24 || deref(c.Memory) != 64 {
		t.Errorf("%s: memoryReservation %d, memory %d: want 24, 64", where, deref(c.MemoryReservation), deref(c.Memory))
	}
}

// TestECSSidecarTaskDefinition: the awsvpc example task has the sidecar
// that inject.ECSTaskDefinition adds, and its app waits for it to be
// HEALTHY.
func TestECSSidecarTaskDefinition(t *testing.T) {
	var task ecs.RegisterTaskDefinitionInput
	readECS(t, "sidecar-task-definition.json", &task)
	if task.NetworkMode != ecstypes.NetworkModeAwsvpc {
		t.Errorf("networkMode %q, want awsvpc: the sidecar needs the task's own network namespace", task.NetworkMode)
	}
	if !slices.Equal(task.RequiresCompatibilities, []ecstypes.Compatibility{ecstypes.CompatibilityEc2}) {
		t.Errorf("requiresCompatibilities %v, want [EC2]: Fargate does not grant NET_ADMIN", task.RequiresCompatibilities)
	}
	if len(task.ContainerDefinitions) != 2 || deref(task.ContainerDefinitions[0].Name) != inject.ContainerName {
		t.Fatalf("%d containers, first %q: want the sidecar first, then the app", len(task.ContainerDefinitions), deref(task.ContainerDefinitions[0].Name))
	}
	sidecar := container(t, &task, inject.ContainerName)
	checkECSProxy(t, "sidecar", sidecar, "NET_ADMIN", "NET_RAW")
	if len(sidecar.Command) == 0 || sidecar.Command[0] != "sidecar" {
		t.Errorf("sidecar command %q: want sidecar ...", sidecar.Command)
	}
	app := container(t, &task, "app")
	if len(app.DependsOn) != 1 || deref(app.DependsOn[0].ContainerName) != inject.ContainerName || app.DependsOn[0].Condition != ecstypes.ContainerConditionHealthy {
		t.Errorf("app dependsOn %+v: want imds-proxy HEALTHY", app.DependsOn)
	}
	if deref(app.User) == "1337" {
		t.Error("the app runs as 1337")
	}
}

// TestECSNodeDaemon: the daemon task runs the node agent in the host
// network namespace, redirecting from Docker's bridges, with its admin
// listener on loopback only; the service is a DAEMON that stops the old
// task before starting the new one.
func TestECSNodeDaemon(t *testing.T) {
	var task ecs.RegisterTaskDefinitionInput
	readECS(t, "node-daemon-task-definition.json", &task)
	if task.NetworkMode != ecstypes.NetworkModeHost {
		t.Errorf("networkMode %q, want host", task.NetworkMode)
	}
	if !slices.Equal(task.RequiresCompatibilities, []ecstypes.Compatibility{ecstypes.CompatibilityEc2}) {
		t.Errorf("requiresCompatibilities %v, want [EC2]", task.RequiresCompatibilities)
	}
	if len(task.ContainerDefinitions) != 1 {
		t.Fatalf("%d containers, want 1", len(task.ContainerDefinitions))
	}
	c := container(t, &task, "imds-proxy")
	// SYS_PTRACE: reading other processes' namespace and descriptor links.
	checkECSProxy(t, "node agent", c, "NET_ADMIN", "NET_RAW", "SYS_PTRACE")
	if len(c.Command) == 0 || c.Command[0] != "node" {
		t.Errorf("command %q: want node ...", c.Command)
	}
	interfaces := strings.Split(mustFlag(t, "node agent", c.Command, "interfaces"), ",")
	if want := []string{"docker0", "br-+", "veth+"}; !slices.Equal(interfaces, want) {
		t.Errorf("--interfaces %v, want %v", interfaces, want)
	}
	if port(t, mustFlag(t, "node agent", c.Command, "listen")) != 8169 {
		t.Error("--listen is not on 8169")
	}
	if m := mustFlag(t, "node agent", c.Command, "metrics-listen"); !strings.HasPrefix(m, "127.0.0.1:") {
		t.Errorf("--metrics-listen=%s: want loopback only, out of the VPC's reach", m)
	}
	if stop := time.Duration(deref(c.StopTimeout)) * time.Second; stop <= proxyShutdownTimeout {
		t.Errorf("stopTimeout %v: want more than the proxy's %v shutdown", stop, proxyShutdownTimeout)
	}
	if deref(c.ReadonlyRootFilesystem) && !slices.ContainsFunc(deref(c.LinuxParameters).Tmpfs, func(m ecstypes.Tmpfs) bool { return deref(m.ContainerPath) == "/run" }) {
		t.Error("read-only root filesystem without a tmpfs at /run for the xtables lock")
	}

	checkECSNodeWorkloads(t, &task, c)

	var svc ecs.CreateServiceInput
	readECS(t, "node-daemon-service.json", &svc)
	if deref(svc.ServiceName) != "imds-proxy-node" || deref(svc.TaskDefinition) != deref(task.Family) {
		t.Errorf("service %q runs task definition %q, want imds-proxy-node running %q", deref(svc.ServiceName), deref(svc.TaskDefinition), deref(task.Family))
	}
	if svc.SchedulingStrategy != ecstypes.SchedulingStrategyDaemon || svc.LaunchType != ecstypes.LaunchTypeEc2 {
		t.Errorf("schedulingStrategy %q, launchType %q: want DAEMON on EC2", svc.SchedulingStrategy, svc.LaunchType)
	}
	dc := deref(svc.DeploymentConfiguration)
	if deref(dc.MaximumPercent) != 100 || dc.MinimumHealthyPercent == nil || *dc.MinimumHealthyPercent != 0 {
		t.Errorf("deploymentConfiguration maximumPercent %v, minimumHealthyPercent %v: want 100 and 0 (stop the old task, then start the new)",
			deref(dc.MaximumPercent), deref(dc.MinimumHealthyPercent))
	}
}

// checkECSNodeWorkloads: the node agent can tell which task a connection
// came from: it sees the host's processes (pidMode host), asks the ECS
// agent's introspection API on the instance, and reads the containers'
// labels (the task definitions' dockerLabels, where imds-proxy.io/v1 goes)
// from the Docker socket, a root-equivalent grant the README says so of.
// No other host path is mounted.
func checkECSNodeWorkloads(t *testing.T, task *ecs.RegisterTaskDefinitionInput, c ecstypes.ContainerDefinition) {
	t.Helper()
	if task.PidMode != ecstypes.PidModeHost {
		t.Errorf("pidMode %q, want host: the agent finds the process behind a connection through the host's /proc", task.PidMode)
	}
	if u := mustFlag(t, "node agent", c.Command, "ecs-introspection"); u != "http://localhost:51678" {
		t.Errorf("--ecs-introspection=%s, want the ECS agent's introspection API, http://localhost:51678", u)
	}
	socket := mustFlag(t, "node agent", c.Command, "docker-socket")
	hostPaths := map[string]string{} // volume name → host path
	for _, v := range task.Volumes {
		if v.Host != nil {
			hostPaths[deref(v.Name)] = deref(v.Host.SourcePath)
		}
	}
	mounted := map[string]string{} // container path → host path
	for _, m := range c.MountPoints {
		mounted[deref(m.ContainerPath)] = hostPaths[deref(m.SourceVolume)]
	}
	if src := mounted[socket]; src != "/var/run/docker.sock" {
		t.Errorf("--docker-socket=%s, but %s is mounted from %q, not the host's /var/run/docker.sock", socket, socket, src)
	}
	for dest, src := range mounted {
		if src != "/var/run/docker.sock" && src != "/var/lib/imds-proxy" {
			t.Errorf("%s is mounted from the host's %q: only the token key's directory and the Docker socket are", dest, src)
		}
	}
	readme, err := os.ReadFile(filepath.Join(ecsDir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, says := range []string{"root-equivalent", "`pidMode` `host`", "dockerLabels"} {
		if !strings.Contains(string(readme), says) {
			t.Errorf("%s/README.md does not say %q: why the node daemon has the host's PIDs and the Docker socket, and what that grants", ecsDir, says)
		}
	}
}
