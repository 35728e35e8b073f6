package inject

import (
	"encoding/json"
	"slices"

	sigsjson "sigs.k8s.io/json"
)

// The few Kubernetes API fields the sidecar is made of, and those that the
// injection decision reads. They are declared here, in the API's field
// order and JSON names, rather than imported from k8s.io/api: every sidecar
// and node agent runs this binary, and linking the API types makes it
// larger on disk and in memory at rest (the README's Layout has the
// figures). The tests decode everything these produce strictly into the
// k8s.io/api types and compare it with them.

// ContainerSpec is a Kubernetes container (core/v1 Container), as far as
// the sidecar uses one.
type ContainerSpec struct {
	Name            string           `json:"name"`
	Image           string           `json:"image,omitempty"`
	Command         []string         `json:"command,omitempty"`
	Args            []string         `json:"args,omitempty"`
	Ports           []ContainerPort  `json:"ports,omitempty"`
	Env             []EnvVar         `json:"env,omitempty"`
	Resources       *Resources       `json:"resources,omitempty"`
	RestartPolicy   string           `json:"restartPolicy,omitempty"`
	VolumeMounts    []VolumeMount    `json:"volumeMounts,omitempty"`
	LivenessProbe   *Probe           `json:"livenessProbe,omitempty"`
	StartupProbe    *Probe           `json:"startupProbe,omitempty"`
	SecurityContext *SecurityContext `json:"securityContext,omitempty"`
}

// ContainerPort is a core/v1 ContainerPort.
type ContainerPort struct {
	Name          string `json:"name,omitempty"`
	ContainerPort int32  `json:"containerPort"`
	Protocol      string `json:"protocol,omitempty"`
}

// Resources is a core/v1 ResourceRequirements, quantities as strings.
type Resources struct {
	Limits   map[string]string `json:"limits,omitempty"`
	Requests map[string]string `json:"requests,omitempty"`
}

// VolumeMount is a core/v1 VolumeMount.
type VolumeMount struct {
	Name      string `json:"name"`
	ReadOnly  bool   `json:"readOnly,omitempty"`
	MountPath string `json:"mountPath"`
}

// EnvVar is a core/v1 EnvVar with a value (valueFrom is never copied).
type EnvVar struct {
	Name  string `json:"name"`
	Value string `json:"value,omitempty"`
}

// Probe is a core/v1 Probe with an HTTP GET handler.
type Probe struct {
	HTTPGet          *HTTPGetAction `json:"httpGet,omitempty"`
	TimeoutSeconds   int32          `json:"timeoutSeconds,omitempty"`
	PeriodSeconds    int32          `json:"periodSeconds,omitempty"`
	FailureThreshold int32          `json:"failureThreshold,omitempty"`
}

// HTTPGetAction is a core/v1 HTTPGetAction on a numbered port.
type HTTPGetAction struct {
	Path string `json:"path,omitempty"`
	Port int32  `json:"port"`
}

// SecurityContext is a core/v1 SecurityContext.
type SecurityContext struct {
	Capabilities             *Capabilities `json:"capabilities,omitempty"`
	Privileged               *bool         `json:"privileged,omitempty"`
	RunAsUser                *int64        `json:"runAsUser,omitempty"`
	RunAsGroup               *int64        `json:"runAsGroup,omitempty"`
	RunAsNonRoot             *bool         `json:"runAsNonRoot,omitempty"`
	ReadOnlyRootFilesystem   *bool         `json:"readOnlyRootFilesystem,omitempty"`
	AllowPrivilegeEscalation *bool         `json:"allowPrivilegeEscalation,omitempty"`
}

// Capabilities is a core/v1 Capabilities.
type Capabilities struct {
	Add  []string `json:"add,omitempty"`
	Drop []string `json:"drop,omitempty"`
}

// VolumeSpec is a core/v1 Volume with an emptyDir source.
type VolumeSpec struct {
	Name     string    `json:"name"`
	EmptyDir *EmptyDir `json:"emptyDir,omitempty"`
}

// EmptyDir is a core/v1 EmptyDirVolumeSource.
type EmptyDir struct {
	Medium    string `json:"medium,omitempty"`
	SizeLimit string `json:"sizeLimit,omitempty"`
}

// podMeta is what the decision reads of a pod's metadata.
type podMeta struct {
	Annotations map[string]string `json:"annotations"`
	Labels      map[string]string `json:"labels"`
}

// podSpec is what the decision reads of a pod's spec.
type podSpec struct {
	HostNetwork     bool                `json:"hostNetwork"`
	SecurityContext *podSecurityContext `json:"securityContext"`
	InitContainers  []podContainer      `json:"initContainers"`
	Containers      []podContainer      `json:"containers"`
	Volumes         []podVolume         `json:"volumes"`
}

// podSecurityContext is what the decision reads of a core/v1
// PodSecurityContext: the UID its containers run as by default.
type podSecurityContext struct {
	RunAsUser *int64 `json:"runAsUser"`
}

// podContainer is what the decision reads of a container, and all of it
// (raw) for telling the sidecar from a container that only has its name.
type podContainer struct {
	Name string   `json:"name"`
	Args []string `json:"args"`
	Env  []struct {
		Name      string          `json:"name"`
		Value     string          `json:"value"`
		ValueFrom json.RawMessage `json:"valueFrom"`
	} `json:"env"`
	VolumeMounts []VolumeMount `json:"volumeMounts"`
	Ports        []struct {
		ContainerPort int32 `json:"containerPort"`
	} `json:"ports"`
	SecurityContext *SecurityContext `json:"securityContext"`
	raw             json.RawMessage
}

// UnmarshalJSON decodes the fields and keeps the whole container.
func (c *podContainer) UnmarshalJSON(data []byte) error {
	type fields podContainer // without this method
	var f fields
	if err := sigsjson.UnmarshalCaseSensitivePreserveInts(data, &f); err != nil {
		return err
	}
	*c = podContainer(f)
	c.raw = slices.Clone(data)
	return nil
}

// podVolume is a volume's name, and all of it (raw).
type podVolume struct {
	Name string `json:"name"`
	raw  json.RawMessage
}

// UnmarshalJSON decodes the name and keeps the whole volume.
func (v *podVolume) UnmarshalJSON(data []byte) error {
	var f struct {
		Name string `json:"name"`
	}
	if err := sigsjson.UnmarshalCaseSensitivePreserveInts(data, &f); err != nil {
		return err
	}
	*v = podVolume{Name: f.Name, raw: slices.Clone(data)}
	return nil
}

// pod is what PodPatch reads of a pod.
type pod struct {
	Metadata podMeta `json:"metadata"`
	Spec     podSpec `json:"spec"`
}
