package proxy

import (
	"net/http"
	"net/netip"

	"github.com/imds-proxy/imds-proxy/workload"
)

// Decide exposes the proxy's decision to the external tests, so that the
// fuzz oracle checks ServeHTTP against the rules themselves: the status of
// the proxy's own answer, or forward true.
func (p *Proxy) Decide(r *http.Request, caller netip.Addr) (status int, forward bool) {
	v := p.decide(r, caller, func() workload.Workload { return workload.Workload{} })
	if v.answer == nil {
		return 0, true
	}
	return v.answer.status, false
}
