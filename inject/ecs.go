package inject

import (
	"encoding/json"
	"fmt"
	"strconv"
)

// ECSTaskDefinition adds the sidecar to a task definition as accepted by
// `aws ecs register-task-definition --cli-input-json`, and makes every other
// container wait until the sidecar is HEALTHY (its redirect exists). Keys
// keep their order; the output is indented JSON. A task definition that
// already has the sidecar comes back unchanged. Only awsvpc tasks have a
// network namespace of their own for the sidecar's redirect.
func ECSTaskDefinition(in []byte, o Options) ([]byte, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	var task object
	if err := json.Unmarshal(in, &task); err != nil {
		return nil, fmt.Errorf("task definition: %w", err)
	}
	if err := checkNetworkMode(task); err != nil {
		return nil, err
	}
	if err := checkLaunchType(task); err != nil {
		return nil, err
	}
	var containers []object
	if err := task.decode("containerDefinitions", &containers); err != nil {
		return nil, err
	}
	if len(containers) == 0 {
		return nil, fmt.Errorf("task definition: containerDefinitions is empty")
	}
	for _, c := range containers {
		if name, _ := c.str("name"); name == ContainerName {
			return in, nil
		}
	}
	for i := range containers {
		if err := addDependsOn(&containers[i]); err != nil {
			name, _ := containers[i].str("name")
			return nil, fmt.Errorf("container %q: %w", name, err)
		}
	}
	sidecar, err := toObject(ecsContainer(o))
	if err != nil {
		return nil, err
	}
	if err := task.set("containerDefinitions", append([]object{sidecar}, containers...)); err != nil {
		return nil, err
	}
	return marshalIndent(task)
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
	var deps []object
	if _, ok := c.get("dependsOn"); ok {
		if err := c.decode("dependsOn", &deps); err != nil {
			return err
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
	return ecsContainerDefinition{
		Name:                   ContainerName,
		Image:                  o.Image,
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
