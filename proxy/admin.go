package proxy

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewAdminHandler serves /metrics from g, /v1-callers, /healthz (the process
// is alive) and /readyz (every readiness check passes). It belongs on its own
// listener, apart from the IMDS port that workloads reach.
func NewAdminHandler(g prometheus.Gatherer, v1Callers http.Handler, readiness ...func() error) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /v1-callers", v1Callers)
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		for _, check := range readiness {
			if err := check(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	return mux
}
