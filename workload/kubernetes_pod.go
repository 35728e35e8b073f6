//go:build kubernetes

package workload

import (
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
)

// The parts of a core/v1 Pod the source reads, decoded from the API
// server's JSON: the typed k8s.io/api/core/v1 package would add about 4 MB
// to the binary (every core type and its protobuf code) for fields the
// source never reads.

// podObject is a core/v1 Pod: its metadata, and of its spec and status what
// names its containers, their images and environments, and its addresses.
type podObject struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              podSpec   `json:"spec,omitempty"`
	Status            podStatus `json:"status,omitempty"`
}

type podSpec struct {
	NodeName            string      `json:"nodeName,omitempty"`
	HostNetwork         bool        `json:"hostNetwork,omitempty"`
	ServiceAccountName  string      `json:"serviceAccountName,omitempty"`
	Containers          []container `json:"containers,omitempty"`
	InitContainers      []container `json:"initContainers,omitempty"`
	EphemeralContainers []container `json:"ephemeralContainers,omitempty"`
}

type container struct {
	Name  string   `json:"name"`
	Image string   `json:"image,omitempty"`
	Env   []envVar `json:"env,omitempty"`
}

// envVar is a container's environment variable; FromSource says it has a
// valueFrom (a secret, a config map, a field) rather than a value.
type envVar struct {
	Name       string    `json:"name"`
	Value      string    `json:"value,omitempty"`
	FromSource *struct{} `json:"valueFrom,omitempty"`
}

type podStatus struct {
	Phase                      string            `json:"phase,omitempty"`
	PodIPs                     []podIP           `json:"podIPs,omitempty"`
	ContainerStatuses          []containerStatus `json:"containerStatuses,omitempty"`
	InitContainerStatuses      []containerStatus `json:"initContainerStatuses,omitempty"`
	EphemeralContainerStatuses []containerStatus `json:"ephemeralContainerStatuses,omitempty"`
}

type podIP struct {
	IP string `json:"ip"`
}

// containerStatus names a container and its runtime's ID,
// "containerd://<id>".
type containerStatus struct {
	Name        string `json:"name"`
	ContainerID string `json:"containerID,omitempty"`
}

type podList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []podObject `json:"items"`
}

var coreV1 = schema.GroupVersion{Version: "v1"}

// podCodecs decode pods, pod lists and watch events of pods (and the
// Status of errors), as JSON.
var podCodecs = func() serializer.CodecFactory {
	s := runtime.NewScheme()
	s.AddKnownTypeWithName(coreV1.WithKind("Pod"), &podObject{})
	s.AddKnownTypeWithName(coreV1.WithKind("PodList"), &podList{})
	metav1.AddToGroupVersion(s, coreV1)
	return serializer.NewCodecFactory(s)
}()

func (p *podObject) DeepCopyObject() runtime.Object { return p.deepCopy() }

func (p *podObject) deepCopy() *podObject {
	if p == nil {
		return nil
	}
	out := &podObject{TypeMeta: p.TypeMeta}
	p.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	out.Spec = podSpec{
		NodeName:            p.Spec.NodeName,
		HostNetwork:         p.Spec.HostNetwork,
		ServiceAccountName:  p.Spec.ServiceAccountName,
		Containers:          copyContainers(p.Spec.Containers),
		InitContainers:      copyContainers(p.Spec.InitContainers),
		EphemeralContainers: copyContainers(p.Spec.EphemeralContainers),
	}
	out.Status = podStatus{
		Phase:                      p.Status.Phase,
		PodIPs:                     slices.Clone(p.Status.PodIPs),
		ContainerStatuses:          slices.Clone(p.Status.ContainerStatuses),
		InitContainerStatuses:      slices.Clone(p.Status.InitContainerStatuses),
		EphemeralContainerStatuses: slices.Clone(p.Status.EphemeralContainerStatuses),
	}
	return out
}

func copyContainers(in []container) []container {
	if in == nil {
		return nil
	}
	out := make([]container, len(in))
	for i, c := range in {
		out[i] = container{Name: c.Name, Image: c.Image}
		if c.Env != nil {
			out[i].Env = make([]envVar, len(c.Env))
			for j, e := range c.Env {
				out[i].Env[j] = envVar{Name: e.Name, Value: e.Value}
				if e.FromSource != nil {
					out[i].Env[j].FromSource = &struct{}{}
				}
			}
		}
	}
	return out
}

func (l *podList) DeepCopyObject() runtime.Object {
	if l == nil {
		return nil
	}
	out := &podList{TypeMeta: l.TypeMeta}
	l.ListMeta.DeepCopyInto(&out.ListMeta)
	if l.Items != nil {
		out.Items = make([]podObject, len(l.Items))
		for i := range l.Items {
			out.Items[i] = *l.Items[i].deepCopy()
		}
	}
	return out
}
