// Package webhook is a Kubernetes mutating admission webhook that adds the
// imds-proxy sidecar to pods, with the same injection as `imds-proxy inject
// k8s`. Which pods reach it is the MutatingWebhookConfiguration's business
// (namespace and pod selectors); the handler injects every pod it is sent
// unless the pod has the sidecar, opts out, runs on the host network or
// clashes with it. Those but the first are violations outside the
// namespaces the operator permits, as are a container named like the
// sidecar that is not it and a container that could bypass the sidecar:
// admitted with a warning, or refused with --on-violation=deny.
package webhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/inject"
)

// MaxBodyBytes bounds an AdmissionReview body. The API server sends the
// pod (at most about 1.5 MiB, etcd's object limit) and little else.
const MaxBodyBytes = 3 << 20

// InjectPath is where the webhook configuration sends pods.
const InjectPath = "/inject"

// Admission results, the values of the result label besides the inject
// package's outcomes (injected, skipped, warned, denied).
const (
	resultIgnored    = "ignored"    // not a pod CREATE
	resultUnreadable = "unreadable" // a pod that does not decode: admitted unchanged
	resultBadRequest = "bad_request"
)

// NewHandler serves InjectPath and /healthz, counting admissions in reg.
func NewHandler(o inject.Options, log *zap.Logger, reg prometheus.Registerer) (http.Handler, error) {
	if err := o.Validate(); err != nil {
		return nil, fmt.Errorf("sidecar options: %w", err)
	}
	admissions := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imds_proxy_webhook_admissions_total",
		Help: "Admission requests by result: injected (or its own sidecar's --v1 raised to the floor), " +
			"skipped (already injected; opted out, hostNetwork or clashing where --allow-opt-out-namespaces permits), " +
			"warned (admitted with a way around the sidecar: a violation, or a container that can bypass it), " +
			"denied (a violation, or a container that can bypass the sidecar, with --on-violation=deny), " +
			"ignored (not a pod CREATE), unreadable (admitted unchanged), " +
			"bad_request (answered 4xx).",
	}, []string{"result"})
	if err := reg.Register(admissions); err != nil {
		return nil, fmt.Errorf("registering metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST "+InjectPath, &handler{options: o, log: log, admissions: admissions})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	return mux, nil
}

type handler struct {
	options    inject.Options
	log        *zap.Logger
	admissions *prometheus.CounterVec
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	review, status, err := readReview(w, r)
	if err != nil {
		h.log.Warn("bad admission request", zap.Int("status", status), zap.Error(err))
		h.admissions.WithLabelValues(resultBadRequest).Inc()
		http.Error(w, err.Error(), status)
		return
	}
	var result string
	review.Response, result = h.admit(review.Request)
	h.admissions.WithLabelValues(result).Inc()
	review.Request = nil
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(review); err != nil {
		h.log.Warn("writing the admission response", zap.Error(err))
	}
}

// readReview reads an AdmissionReview v1 request, or says which status
// its sender gets and why.
func readReview(w http.ResponseWriter, r *http.Request) (*admissionReview, int, error) {
	if media, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || media != "application/json" {
		return nil, http.StatusUnsupportedMediaType, fmt.Errorf("content type %q: want application/json", r.Header.Get("Content-Type"))
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	var tooLarge *http.MaxBytesError
	if errors.As(err, &tooLarge) {
		return nil, http.StatusRequestEntityTooLarge, fmt.Errorf("body larger than %d bytes", MaxBodyBytes)
	}
	if err != nil {
		return nil, http.StatusBadRequest, fmt.Errorf("reading the body: %w", err)
	}
	var review admissionReview
	if err := json.Unmarshal(body, &review); err != nil {
		return nil, http.StatusBadRequest, fmt.Errorf("malformed AdmissionReview: %w", err)
	}
	if review.APIVersion != reviewAPIVersion || review.Kind != reviewKind || review.Request == nil {
		return nil, http.StatusBadRequest, fmt.Errorf("want an admission.k8s.io/v1 AdmissionReview with a request, got %q %q", review.APIVersion, review.Kind)
	}
	return &review, 0, nil
}

// admit decides one request, and says how for the metric. A pod is
// refused only for a violation (a container that can bypass the sidecar
// is one), with --on-violation=deny.
func (h *handler) admit(req *admissionRequest) (*admissionResponse, string) {
	resp := &admissionResponse{UID: req.UID, Allowed: true}
	if req.Resource != podResource || req.SubResource != "" || req.Operation != operationCreate {
		return resp, resultIgnored
	}
	var pod struct {
		Metadata struct{ Name, GenerateName string }
	}
	_ = json.Unmarshal(req.Object, &pod) // for the log line only
	name := pod.Metadata.Name
	if name == "" {
		name = pod.Metadata.GenerateName + "*" // controllers' pods have no name yet at admission
	}
	fields := []zap.Field{zap.String("namespace", req.Namespace), zap.String("pod", name)}
	a, err := inject.PodPatch(req.Object, req.Namespace, h.options)
	if err != nil {
		// The API server decoded this pod, so only a bug here makes it
		// unreadable: where the policy refuses pods without the sidecar,
		// it refuses this one too.
		policy := h.options.Policy
		if policy.Denies() && !policy.Permits(req.Namespace) {
			h.log.Warn("pod refused: cannot read it", append(fields, zap.Error(err))...)
			deny(resp, "cannot read the pod to inject the sidecar: "+err.Error())
			return resp, string(inject.Denied)
		}
		h.log.Warn("pod admitted without the sidecar: cannot read it", append(fields, zap.Error(err))...)
		resp.Warnings = []string{"imds-proxy: pod not injected: " + err.Error()}
		return resp, resultUnreadable
	}
	for _, w := range a.Warnings {
		resp.Warnings = append(resp.Warnings, "imds-proxy: "+w)
	}
	if a.Reason != "" {
		fields = append(fields, zap.String("reason", a.Reason))
	}
	if len(a.Warnings) > 0 {
		fields = append(fields, zap.Strings("warnings", a.Warnings))
	}
	switch a.Outcome {
	case inject.Denied:
		h.log.Warn("pod refused", fields...)
		deny(resp, a.Reason)
	case inject.Warned:
		// A pod that keeps its own sidecar is warned about its
		// containers, with no reason and no patch.
		if a.Patch == nil && a.Reason != "" {
			resp.Warnings = append(resp.Warnings, "imds-proxy: pod not injected: "+a.Reason)
		}
		h.log.Warn("pod admitted with a way around the sidecar", fields...)
	case inject.Skipped:
		h.log.Info("pod admitted without the sidecar", fields...)
	default:
		h.log.Info("sidecar injected", fields...)
	}
	if a.Patch != nil {
		resp.Patch, resp.PatchType = a.Patch, patchTypeJSON
	}
	return resp, string(a.Outcome)
}

// deny turns resp into a refusal that the API server shows the pod's
// creator as: admission webhook "..." denied the request: <message>.
func deny(resp *admissionResponse, reason string) {
	resp.Allowed = false
	resp.Result = &status{Status: "Failure", Message: "imds-proxy: pod refused: " + reason, Reason: "Forbidden", Code: http.StatusForbidden}
}
