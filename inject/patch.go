package inject

import (
	"encoding/json"
	"fmt"

	sigsjson "sigs.k8s.io/json"
)

// PatchOperation is one RFC 6902 JSON Patch operation.
type PatchOperation struct {
	Op    string `json:"op"`
	Path  string `json:"path"`
	Value any    `json:"value,omitempty"`
}

// Admission is the decision for one pod, as the webhook answers it.
type Admission struct {
	Outcome  Outcome
	Patch    []byte   // a JSON Patch, or nil: the pod stays as it is
	Reason   string   // why the pod gets no sidecar, if it gets none
	Warnings []string // what the pod's author should hear
}

// PodPatch decides for a pod (its JSON, as an AdmissionReview carries it)
// in namespace. Its JSON Patch adds the same sidecar that the Kubernetes
// function adds to a manifest, or raises the --v1 of a sidecar the pod
// already has to the floor. A pod that does not decode is an error.
func PodPatch(podJSON []byte, namespace string, o Options) (Admission, error) {
	if err := o.Validate(); err != nil {
		return Admission{}, err
	}
	o = o.withFloor()
	var pod pod
	if err := sigsjson.UnmarshalCaseSensitivePreserveInts(podJSON, &pod); err != nil {
		return Admission{}, fmt.Errorf("reading the pod: %w", err)
	}
	d := decide(pod.Metadata, &pod.Spec, namespace, o)
	a := Admission{Outcome: d.outcome, Reason: d.reason, Warnings: d.warnings}
	var ops []PatchOperation
	switch {
	case d.inject != nil:
		ops = []PatchOperation{
			prepend("/spec/initContainers", len(pod.Spec.InitContainers), Container(*d.inject)),
			appendTo("/spec/volumes", len(pod.Spec.Volumes), RunVolume()),
		}
	case d.raise != nil:
		ops = []PatchOperation{{Op: "replace", Path: fmt.Sprintf("/spec/initContainers/%d/args/%d", d.raise.container, d.raise.arg), Value: d.raise.value}}
	default:
		return a, nil
	}
	var err error
	a.Patch, err = json.Marshal(ops)
	return a, err
}

// prepend adds v as the first element of the array at path, creating the
// array if it has n = 0 elements (it may then be absent).
func prepend(path string, n int, v any) PatchOperation {
	if n == 0 {
		return PatchOperation{Op: "add", Path: path, Value: []any{v}}
	}
	return PatchOperation{Op: "add", Path: path + "/0", Value: v}
}

// appendTo adds v as the last element of the array at path, creating it if
// it has n = 0 elements.
func appendTo(path string, n int, v any) PatchOperation {
	if n == 0 {
		return PatchOperation{Op: "add", Path: path, Value: []any{v}}
	}
	return PatchOperation{Op: "add", Path: path + "/-", Value: v}
}
