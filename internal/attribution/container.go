package attribution

import (
	"regexp"
	"strings"
)

// Container is the runtime container a process runs in, as its cgroup
// path names it. Every field is "" where the path does not tell.
type Container struct {
	// Runtime is "containerd", "cri-o" or "docker" (ECS tasks run on Docker).
	Runtime string `json:"runtime,omitempty"`
	// ID is the runtime's container ID: 64 hexadecimal digits.
	ID string `json:"container_id,omitempty"`
	// PodUID is the Kubernetes pod's UID, for a container of a pod.
	PodUID string `json:"pod_uid,omitempty"`
	// TaskID is the ECS task's ID, for a container of an ECS task.
	TaskID string `json:"task_id,omitempty"`
}

// The cgroup path shapes of the runtimes, under either cgroup driver:
//
//	/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
//	/kubepods/burstable/pod<uid>/<id>
//	/kubepods.slice/kubepods-pod<uid_>.slice/crio-<id>.scope
//	/ecs/<task-id>/<id>
//	/system.slice/docker-<id>.scope, /docker/<id>
//
// A reader in a cgroup namespace of its own (a node agent's container, on
// cgroup v2) sees them below "/..", so none is anchored at the root.
var (
	podUIDPattern    = regexp.MustCompile(`pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?/`)
	containerPattern = regexp.MustCompile(`(?:^|/)(?:(cri-containerd|crio|docker)-)?([0-9a-f]{64})(?:\.scope)?$`)
	ecsTaskPattern   = regexp.MustCompile(`(?:^|/)ecs/([0-9a-f]{32}|[0-9a-f-]{36})/`)
)

// ParseCgroup reads the container from a process's /proc/<pid>/cgroup:
// the cgroup v2 line ("0::<path>"), or the first v1 line with a container
// in its path.
func ParseCgroup(cgroup string) Container {
	for _, line := range strings.Split(cgroup, "\n") {
		parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if c := parseCgroupPath(parts[2]); c.ID != "" {
			return c
		}
	}
	return Container{}
}

func parseCgroupPath(path string) Container {
	m := containerPattern.FindStringSubmatch(path)
	if m == nil {
		return Container{}
	}
	c := Container{ID: m[2]}
	switch prefix := m[1]; {
	case prefix == "cri-containerd":
		c.Runtime = "containerd"
	case prefix == "crio":
		c.Runtime = "cri-o"
	case prefix == "docker" || strings.Contains(path, "/docker/") || ecsTaskPattern.MatchString(path):
		c.Runtime = "docker"
	case strings.Contains(path, "kubepods"):
		c.Runtime = "containerd" // the cgroupfs driver names no runtime; containerd is EKS's
	}
	if p := podUIDPattern.FindStringSubmatch(path); p != nil {
		c.PodUID = strings.ReplaceAll(p[1], "_", "-")
	}
	if t := ecsTaskPattern.FindStringSubmatch(path); t != nil {
		c.TaskID = t[1]
	}
	return c
}
