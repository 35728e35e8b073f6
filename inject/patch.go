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

// PodPatch is the JSON Patch that adds the sidecar to a pod (its JSON, as
// an AdmissionReview carries it): the same sidecar that the Kubernetes
// function adds to a manifest. A pod that gets no sidecar (already
// injected, opted out, hostNetwork, clashing) gets a nil patch and the
// reason, and a pod whose annotations could not be honoured gets a warning.
// A pod that does not decode is an error.
func PodPatch(podJSON []byte, o Options) (patch []byte, reason, warning string, err error) {
	if err := o.Validate(); err != nil {
		return nil, "", "", err
	}
	var pod pod
	if err := sigsjson.UnmarshalCaseSensitivePreserveInts(podJSON, &pod); err != nil {
		return nil, "", "", fmt.Errorf("reading the pod: %w", err)
	}
	if s := decide(pod.Metadata, &pod.Spec, o); s.reason != "" {
		return nil, s.reason, "", nil
	}
	o, warning = o.forPod(pod.Metadata)
	ops := []PatchOperation{
		prepend("/spec/initContainers", len(pod.Spec.InitContainers), Container(o)),
		appendTo("/spec/volumes", len(pod.Spec.Volumes), RunVolume()),
	}
	patch, err = json.Marshal(ops)
	return patch, "", warning, err
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
