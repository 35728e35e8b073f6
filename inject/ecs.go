package inject

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	sigsjson "sigs.k8s.io/json"
)

// ECSTaskDefinition is ECS for a caller with nowhere to show notes: it
// refuses a violation whatever o.Policy.OnViolation says.
func ECSTaskDefinition(in []byte, o Options) ([]byte, error) {
	o.Policy.OnViolation = Deny
	out, _, err := ECS(in, o)
	return out, err
}

// ECS adds the sidecar to a task definition as accepted by `aws ecs
// register-task-definition --cli-input-json`, and makes every other
// container wait until the sidecar is HEALTHY (its redirect exists). Keys
// keep their order; the output is indented JSON. Only awsvpc tasks have a
// network namespace of their own for the sidecar's redirect.
//
// A task definition that already has the sidecar, exactly as ECS adds it,
// keeps it: its --v1 is raised to o.Policy.V1Floor, and containers that do
// not wait for it are made to. A container named ContainerName that is not
// the sidecar is a violation: with o.Policy.OnViolation Deny an error, else
// a note and the task definition unchanged. So is a container that could
// bypass the sidecar (privileged, adding NET_ADMIN, or any in a task with
// a shared pidMode): with Deny an error, else a note and the sidecar added
// or kept.
func ECS(in []byte, o Options) (out []byte, notes []string, err error) {
	if err := o.Validate(); err != nil {
		return nil, nil, err
	}
	o = o.withFloor()
	var task object
	if err := json.Unmarshal(in, &task); err != nil {
		return nil, nil, fmt.Errorf("task definition: %w", err)
	}
	if err := checkNetworkMode(task); err != nil {
		return nil, nil, err
	}
	if err := checkLaunchType(task); err != nil {
		return nil, nil, err
	}
	if o.Credentials == imdsapi.CredentialsWorkload {
		// The ECS agent gives every container of a task with a task role
		// the role's credentials endpoint, the sidecar too: its ARN names it.
		if o.WorkloadRoleARN, _ = task.str("taskRoleArn"); o.WorkloadRoleARN == "" {
			return nil, nil, fmt.Errorf("--credentials workload: the task definition has no taskRoleArn, so no role of its own to serve")
		}
	}
	var containers []object
	if err := task.decode("containerDefinitions", &containers); err != nil {
		return nil, nil, err
	}
	if len(containers) == 0 {
		return nil, nil, fmt.Errorf("task definition: containerDefinitions is empty")
	}
	for i, c := range containers {
		if name, _ := c.str("name"); name == ContainerName {
			return keepECSSidecar(in, task, containers, i, o)
		}
	}
	notes, err = ecsBypasses(task, containers, -1, o)
	if err != nil {
		return nil, nil, err
	}
	for i := range containers {
		if err := addDependsOn(&containers[i]); err != nil {
			return nil, nil, err
		}
	}
	sidecar, err := toObject(ecsContainer(o))
	if err != nil {
		return nil, nil, err
	}
	if err := task.set("containerDefinitions", append([]object{sidecar}, containers...)); err != nil {
		return nil, nil, err
	}
	out, err = marshalIndent(task)
	return out, notes, err
}

// keepECSSidecar handles a task definition whose container i is named
// ContainerName.
func keepECSSidecar(in []byte, task object, containers []object, i int, o Options) ([]byte, []string, error) {
	command, arg, policy, why := ecsSidecar(containers[i], o)
	if why != "" {
		reason := "container " + ContainerName + " is not the sidecar (" + why + "): rename or remove it, and inject again"
		if o.Policy.Denies() {
			return nil, nil, fmt.Errorf("task definition refused (--on-violation=deny): %s", reason)
		}
		return in, []string{"task definition not injected: " + reason}, nil
	}
	notes, err := ecsBypasses(task, containers, i, o)
	if err != nil {
		return nil, nil, err
	}
	if note := otherRole(o.withCredentials(command, nil), o); note != "" {
		notes = append(notes, note)
	}
	changed := false
	if o.Policy.looser(policy) {
		command[arg] = "--v1=" + string(o.Policy.V1Floor)
		if err := containers[i].set("command", command); err != nil {
			return nil, nil, err
		}
		changed = true
		notes = append(notes, fmt.Sprintf("the %s container's --v1=%s is looser than the floor (--v1-floor=%s); it runs with %s",
			ContainerName, policy, o.Policy.V1Floor, command[arg]))
	}
	for j := range containers {
		if j == i {
			continue
		}
		waits, err := waitsForSidecar(containers[j])
		if err != nil {
			return nil, nil, err
		}
		if !waits {
			changed = true
			if err := addDependsOn(&containers[j]); err != nil {
				return nil, nil, err
			}
		}
	}
	if !changed {
		return in, notes, nil
	}
	if err := task.set("containerDefinitions", containers); err != nil {
		return nil, nil, err
	}
	out, err := marshalIndent(task)
	return out, notes, err
}

// ecsSidecar reads c, a container named ContainerName: its command, where
// --v1 is in it and what it says, or why c is not the sidecar ECS adds.
func ecsSidecar(c object, o Options) (command []string, arg int, policy imdsapi.V1Policy, why string) {
	_ = c.decode("command", &command) // a missing or odd command has no --v1
	if arg, policy, why = v1Arg(command, "command"); why != "" {
		return nil, arg, "", why
	}
	withV1 := o.withCredentials(command, nil)
	withV1.V1 = policy
	raw, err := json.Marshal(c)
	if err != nil {
		return nil, arg, "", err.Error()
	}
	if path := differs(raw, ecsContainer(withV1)); path != "" {
		return nil, arg, "", "it differs from the sidecar at " + path
	}
	return command, arg, policy, ""
}

// ecsBypasses names the ways around the sidecar (container sidecar, -1 if
// it is yet to be added) that a task definition opens, as notes; with
// o.Policy.OnViolation Deny it refuses the task definition instead. ECS has
// no namespaces for the policy to permit.
func ecsBypasses(task object, containers []object, sidecar int, o Options) ([]string, error) {
	var out []string
	// A shared PID namespace lets a root container signal the sidecar,
	// which removes its redirect when it stops on SIGTERM.
	if mode, _ := task.str("pidMode"); mode == "task" || mode == "host" {
		out = append(out, fmt.Sprintf("pidMode %s: the task's containers share a process namespace with the sidecar, so one running as root "+
			"can stop it, and a sidecar stopped with SIGTERM removes its redirect", mode))
	}
	for i, c := range containers {
		if i == sidecar {
			continue
		}
		var def struct {
			Name            string `json:"name"`
			Privileged      *bool  `json:"privileged"`
			LinuxParameters *struct {
				Capabilities *Capabilities `json:"capabilities"`
			} `json:"linuxParameters"`
		}
		raw, err := json.Marshal(c)
		if err == nil {
			// Case-sensitive, as the AWS CLI reads the field names.
			err = sigsjson.UnmarshalCaseSensitivePreserveInts(raw, &def)
		}
		if err != nil {
			return nil, fmt.Errorf("containerDefinitions[%d]: %w", i, err)
		}
		sc := &SecurityContext{Privileged: def.Privileged}
		if def.LinuxParameters != nil {
			sc.Capabilities = def.LinuxParameters.Capabilities
		}
		if finding := netAdminBypass(def.Name, sc); finding != "" {
			out = append(out, finding)
		}
	}
	if len(out) > 0 && o.Policy.Denies() {
		return nil, fmt.Errorf("task definition refused (--on-violation=deny): %s", strings.Join(out, "; "))
	}
	return out, nil
}

// waitsForSidecar says whether c starts only once the sidecar is HEALTHY.
func waitsForSidecar(c object) (bool, error) {
	var deps []ecsDependency
	if _, ok := c.get("dependsOn"); ok {
		if err := c.decode("dependsOn", &deps); err != nil {
			name, _ := c.str("name")
			return false, fmt.Errorf("container %q: %w", name, err)
		}
	}
	return slices.Contains(deps, ecsDependency{ContainerName: ContainerName, Condition: "HEALTHY"}), nil
}

func checkNetworkMode(task object) error {
	mode, ok := task.str("networkMode")
	if mode == "awsvpc" {
		return nil
	}
	if !ok {
		mode = "bridge (the default)"
	}
	return fmt.Errorf("task definition networkMode is %s: the sidecar needs the task's own network namespace "+
		"(networkMode awsvpc). For bridge and host tasks run the node agent on the instance instead "+
		"(`imds-proxy node`, deploy/ecs/node-daemon-task-definition.json)", mode)
}

// checkLaunchType refuses Fargate: it grants no NET_ADMIN, so the sidecar
// could not install its redirect (and registering the task would fail).
func checkLaunchType(task object) error {
	var compatibilities []string
	if _, ok := task.get("requiresCompatibilities"); ok {
		if err := task.decode("requiresCompatibilities", &compatibilities); err != nil {
			return err
		}
	}
	for _, c := range compatibilities {
		if c == "FARGATE" {
			return fmt.Errorf("task definition requires FARGATE, which does not grant the NET_ADMIN capability " +
				"the sidecar's redirect needs; the sidecar runs on the EC2 launch type only")
		}
	}
	return nil
}

// addDependsOn makes c start only once the sidecar is HEALTHY.
func addDependsOn(c *object) error {
	name, _ := c.str("name")
	var deps []object
	if _, ok := c.get("dependsOn"); ok {
		if err := c.decode("dependsOn", &deps); err != nil {
			return fmt.Errorf("container %q: %w", name, err)
		}
	}
	dep, err := toObject(ecsDependency{ContainerName: ContainerName, Condition: "HEALTHY"})
	if err != nil {
		return err
	}
	return c.set("dependsOn", append(deps, dep))
}

// ecsContainer is the sidecar's container definition. It runs as root
// with only the capabilities iptables needs; the health check is the
// proxy's own readiness (rules installed, upstream decided).
func ecsContainer(o Options) ecsContainerDefinition {
	admin := "127.0.0.1:" + strconv.Itoa(o.MetricsPort)
	var entryPoint []string
	if o.Credentials == imdsapi.CredentialsWorkload {
		entryPoint = []string{WorkloadRoleCommand}
	}
	return ecsContainerDefinition{
		Name:                   ContainerName,
		Image:                  o.Image,
		EntryPoint:             entryPoint,
		Essential:              true,
		User:                   "0",
		Command:                o.args("127.0.0.1"), // the health check runs inside the task
		ReadonlyRootFilesystem: true,
		LinuxParameters: ecsLinuxParameters{
			Capabilities: ecsCapabilities{Add: []string{"NET_ADMIN", "NET_RAW"}, Drop: []string{"ALL"}},
			Tmpfs:        []ecsTmpfs{{ContainerPath: "/run", Size: 1}}, // iptables-legacy's lock
		},
		HealthCheck:       ecsHealthCheck{Command: []string{"CMD", "/usr/local/bin/imds-proxy", "ready", "--url=http://" + admin + "/readyz"}, Interval: 5, Timeout: 2, Retries: 3, StartPeriod: 10},
		MemoryReservation: 24,
		Memory:            64,
	}
}

type ecsContainerDefinition struct {
	Name                   string             `json:"name"`
	Image                  string             `json:"image"`
	EntryPoint             []string           `json:"entryPoint,omitempty"`
	Essential              bool               `json:"essential"`
	User                   string             `json:"user"`
	Command                []string           `json:"command"`
	ReadonlyRootFilesystem bool               `json:"readonlyRootFilesystem"`
	LinuxParameters        ecsLinuxParameters `json:"linuxParameters"`
	HealthCheck            ecsHealthCheck     `json:"healthCheck"`
	MemoryReservation      int                `json:"memoryReservation"`
	Memory                 int                `json:"memory"`
}

type ecsLinuxParameters struct {
	Capabilities ecsCapabilities `json:"capabilities"`
	Tmpfs        []ecsTmpfs      `json:"tmpfs"`
}

type ecsTmpfs struct {
	ContainerPath string `json:"containerPath"`
	Size          int    `json:"size"` // MiB
}

type ecsCapabilities struct {
	Add  []string `json:"add"`
	Drop []string `json:"drop"`
}

type ecsHealthCheck struct {
	Command     []string `json:"command"`
	Interval    int      `json:"interval"`
	Timeout     int      `json:"timeout"`
	Retries     int      `json:"retries"`
	StartPeriod int      `json:"startPeriod"`
}

type ecsDependency struct {
	ContainerName string `json:"containerName"`
	Condition     string `json:"condition"`
}

func marshalIndent(v any) ([]byte, error) {
	out, err := json.MarshalIndent(v, "", "  ")
	return append(out, '\n'), err
}
