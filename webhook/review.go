package webhook

import "encoding/json"

// The AdmissionReview v1 fields the webhook reads and writes (the API's
// JSON names), declared here rather than imported from k8s.io/api so that
// the binary every sidecar runs stays small (see inject/k8s.go). The tests
// build their requests and read the answers with the k8s.io/api types.

// admissionReview is an admission.k8s.io/v1 AdmissionReview.
type admissionReview struct {
	APIVersion string             `json:"apiVersion"`
	Kind       string             `json:"kind"`
	Request    *admissionRequest  `json:"request,omitempty"`
	Response   *admissionResponse `json:"response,omitempty"`
}

type admissionRequest struct {
	UID         string          `json:"uid"`
	Resource    resource        `json:"resource"`
	SubResource string          `json:"subResource,omitempty"`
	Namespace   string          `json:"namespace,omitempty"`
	Operation   string          `json:"operation"`
	Object      json.RawMessage `json:"object,omitempty"`
}

type resource struct {
	Group    string `json:"group"`
	Version  string `json:"version"`
	Resource string `json:"resource"`
}

type admissionResponse struct {
	UID       string   `json:"uid"`
	Allowed   bool     `json:"allowed"`
	Result    *status  `json:"status,omitempty"`
	Patch     []byte   `json:"patch,omitempty"`
	PatchType string   `json:"patchType,omitempty"`
	Warnings  []string `json:"warnings,omitempty"`
}

// status is a meta/v1 Status: why a request is refused.
type status struct {
	Status  string `json:"status"`
	Message string `json:"message"`
	Reason  string `json:"reason"`
	Code    int32  `json:"code"`
}

const (
	reviewAPIVersion = "admission.k8s.io/v1"
	reviewKind       = "AdmissionReview"
	operationCreate  = "CREATE"
	patchTypeJSON    = "JSONPatch"
)

var podResource = resource{Version: "v1", Resource: "pods"}
