// Package doctor probes an IMDS endpoint from the current network namespace
// and explains in plain words what a workload here would experience: whether
// IMDSv2 works, whether the hop limit eats token responses, whether IMDSv1 is
// allowed, and whether an imds-proxy and its redirect are in place.
package doctor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/iptables"
)

// Exit codes, one per diagnosis.
const (
	ExitHealthy       = 0
	ExitHopLimit      = 2
	ExitUnreachable   = 3
	ExitV2Refused     = 4
	ExitV2Unavailable = 5
	ExitNodeAgent     = 6
	ExitWorkloadRole  = 7
)

// Probe is one HTTP exchange's outcome.
type Probe struct {
	Status   int     `json:"status,omitempty"`
	Seconds  float64 `json:"seconds"`
	Error    string  `json:"error,omitempty"`
	TimedOut bool    `json:"timed_out,omitempty"`
}

// Report is everything doctor found, and its verdict.
type Report struct {
	Endpoint       string `json:"endpoint"`
	Connects       bool   `json:"connects"`
	ConnectError   string `json:"connect_error,omitempty"`
	Token          Probe  `json:"token"`
	V2Get          *Probe `json:"v2_get,omitempty"`
	V1Get          Probe  `json:"v1_get"`
	TokensRequired bool   `json:"tokens_required"`
	Proxy          string `json:"proxy,omitempty"`
	// Role is the role path as an IMDSv2 client finds it, where a proxy
	// serves the workload's own role there (--credentials=workload).
	Role  *RoleProbe `json:"workload_role,omitempty"`
	Rules string     `json:"redirect_rules"`
	// Node is the node agent's delivery, when its rules are in this
	// namespace (doctor run on the node).
	Node      *iptables.NodeInspection `json:"node_agent,omitempty"`
	Diagnosis string                   `json:"diagnosis"`
	Fixes     []string                 `json:"fixes,omitempty"`
	ExitCode  int                      `json:"exit_code"`
}

// RoleProbe is the role path's listing (iam/security-credentials/) where a
// proxy answers it from the workload's own role.
type RoleProbe struct {
	Probe
	// Served is the proxy's imdsapi.CredentialsHeader: "workload; source=...".
	Served string `json:"served"`
	// Name is the role the listing names, on a 200.
	Name string `json:"name,omitempty"`
}

// Config bounds the probes; the sum stays under five seconds.
type Config struct {
	Endpoint       *url.URL
	ConnectTimeout time.Duration
	TokenTimeout   time.Duration
	GetTimeout     time.Duration
	// Rules reports whether imds-proxy redirect rules exist here:
	// "present", "absent", or "unknown" with the reason (RulesHere).
	Rules func() string
	// Node inspects a node agent's rules in this namespace: nil without
	// them, or an error when they cannot be read.
	Node func() (*iptables.NodeInspection, error)
}

// RulesHere says whether imds-proxy redirect rules exist in this namespace,
// whether IPv6 IMDS traffic gets past them, and whether an app container
// could forge their exemption. It needs NET_ADMIN to tell.
func RulesHere() string {
	return describeRules(func() (bool, error) { return iptables.Present(iptables.IPv4) },
		iptables.IPv6Uncovered, iptables.InstalledExemption)
}

// describeRules is RulesHere with its readers of the rules given: present
// (iptables.Present), ipv6Uncovered (iptables.IPv6Uncovered) and
// exemption (iptables.InstalledExemption). Each is read only when the
// answer depends on it.
func describeRules(present func() (bool, error), ipv6Uncovered func() error, exemption func() (string, error)) string {
	ok, err := present()
	switch {
	case err != nil:
		return "unknown (" + err.Error() + ")"
	case !ok:
		return "absent"
	}
	if err := ipv6Uncovered(); err != nil {
		return "present for IPv4 only: " + err.Error()
	}
	// A sidecar's exemption: only the cgroup one is out of app containers' reach.
	switch kind, _ := exemption(); {
	case kind == "":
	case strings.Contains(kind, "mark") || strings.Contains(kind, "uid"):
		return "present, exempting the proxy by " + kind + ": an app container with NET_RAW or CAP_SETUID " +
			"(Docker and containerd defaults) can forge that and bypass the proxy"
	default:
		return "present, exempting the proxy's own cgroup"
	}
	return "present"
}

// Run probes the endpoint and diagnoses what it found.
func Run(ctx context.Context, cfg Config) Report {
	r := Report{Endpoint: cfg.Endpoint.String(), Rules: "unknown"}
	if cfg.Rules != nil {
		r.Rules = cfg.Rules()
	}
	if cfg.Node != nil {
		r.Node, _ = cfg.Node() // unreadable rules are reported by Rules
	}
	client := &http.Client{
		Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true,
			DialContext: (&net.Dialer{Timeout: cfg.ConnectTimeout}).DialContext},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	addr := cfg.Endpoint.Host
	if cfg.Endpoint.Port() == "" {
		addr = net.JoinHostPort(cfg.Endpoint.Hostname(), "80")
	}
	conn, err := (&net.Dialer{Timeout: cfg.ConnectTimeout}).DialContext(ctx, "tcp", addr)
	if err != nil {
		r.ConnectError = connectError(err)
		return diagnose(r)
	}
	conn.Close()
	r.Connects = true
	var tok string
	r.Token, tok, r.Proxy = probeToken(ctx, client, cfg)
	if tok != "" {
		p, _, _ := probeGet(ctx, client, cfg, "/latest/meta-data/", tok)
		r.V2Get = &p
		r.Role = probeRole(ctx, client, cfg, tok)
	}
	r.V1Get, _, _ = probeGet(ctx, client, cfg, "/latest/meta-data/", "")
	r.TokensRequired = r.V1Get.Status == http.StatusUnauthorized
	return diagnose(r)
}

// connectError names how a connection failed: "timed out", "refused",
// "no route" or the error itself.
func connectError(err error) string {
	var netErr net.Error
	switch {
	case errors.As(err, &netErr) && netErr.Timeout(), errors.Is(err, context.DeadlineExceeded):
		return "timed out"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "no route"
	}
	return err.Error()
}

func probeToken(ctx context.Context, client *http.Client, cfg Config) (Probe, string, string) {
	ctx, cancel := context.WithTimeout(ctx, cfg.TokenTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, cfg.Endpoint.JoinPath(imdsapi.TokenPath).String(), nil)
	req.Header.Set(imdsapi.TokenTTLHeader, "60")
	req.Header.Set("User-Agent", "imds-proxy-doctor")
	p, body, header := do(client, req)
	if p.Status != http.StatusOK {
		return p, "", header.Get(imdsapi.ProxyHeader)
	}
	return p, body, header.Get(imdsapi.ProxyHeader)
}

// probeGet GETs path with tok (none if "") within cfg.GetTimeout, and
// returns the probe, the body and the header.
func probeGet(ctx context.Context, client *http.Client, cfg Config, path, tok string) (Probe, string, http.Header) {
	ctx, cancel := context.WithTimeout(ctx, cfg.GetTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, cfg.Endpoint.JoinPath(path).String(), nil)
	req.Header.Set("User-Agent", "imds-proxy-doctor")
	if tok != "" {
		req.Header.Set(imdsapi.TokenHeader, tok)
	}
	return do(client, req)
}

// probeRole asks for the role path's listing, and reports it where a proxy
// serves the workload's own role there, else nil.
func probeRole(ctx context.Context, client *http.Client, cfg Config, tok string) *RoleProbe {
	p, body, header := probeGet(ctx, client, cfg, "/latest/meta-data/iam/security-credentials/", tok)
	served := header.Get(imdsapi.CredentialsHeader)
	if served == "" {
		return nil
	}
	r := &RoleProbe{Probe: p, Served: served}
	if p.Status == http.StatusOK {
		r.Name = strings.TrimSpace(body)
	}
	return r
}

func do(client *http.Client, req *http.Request) (Probe, string, http.Header) {
	start := time.Now()
	resp, err := client.Do(req)
	p := Probe{Seconds: time.Since(start).Seconds()}
	if err != nil {
		p.Error = err.Error()
		var netErr net.Error
		p.TimedOut = errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &netErr) && netErr.Timeout())
		return p, "", nil
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	p.Status = resp.StatusCode
	return p, string(body), resp.Header
}

var hopLimitFixes = []string{
	"aws ec2 modify-instance-metadata-options --instance-id <instance-id> --http-put-response-hop-limit 2",
	"or run imds-proxy in node mode on the host (hostNetwork DaemonSet / ECS daemon service)",
	"or run imds-proxy as a sidecar chained to the node agent (--upstream http://<node address>:8169)",
}

// diagnose turns the probes into one verdict, its fixes and its exit code.
func diagnose(r Report) Report {
	switch {
	case !r.Connects && r.ConnectError == "timed out":
		r.Diagnosis = "IMDS is unreachable from here: connections to " + r.Endpoint + " time out, so packets " +
			"are dropped on the way. Not the hop limit, which lets connections open. In a container the usual cause " +
			"is a redirect that drops them: a node agent's REDIRECT onto a host interface without an IPv4 address " +
			"(the VPC CNI, Calico and Cilium host veths), or a NetworkPolicy or firewall"
		r.Fixes = []string{"run imds-proxy doctor on the node: it checks the node agent's rules and interfaces",
			"check NetworkPolicies and host firewalls for 169.254.169.254:80",
			"aws ec2 modify-instance-metadata-options --instance-id <instance-id> --http-endpoint enabled"}
		r.ExitCode = ExitUnreachable
	case !r.Connects && r.ConnectError == "refused":
		r.Diagnosis = "IMDS is unreachable from here: connections to " + r.Endpoint + " are refused. " +
			"A redirect sends them to a proxy port where nothing listens (an imds-proxy that stopped with " +
			"--keep-rules-on-exit), or the endpoint is wrong"
		r.Fixes = []string{"start the imds-proxy these rules belong to, or remove them: imds-proxy rules remove"}
		r.ExitCode = ExitUnreachable
	case !r.Connects:
		r.Diagnosis = "IMDS is unreachable from here: nothing accepts connections at " + r.Endpoint +
			" (" + r.ConnectError + ": no route, a firewall, or the instance's metadata endpoint is disabled: HttpEndpoint=disabled)"
		r.Fixes = []string{"aws ec2 modify-instance-metadata-options --instance-id <instance-id> --http-endpoint enabled"}
		r.ExitCode = ExitUnreachable
	case r.Node != nil && len(r.Node.Problems) > 0:
		r.Diagnosis = "the node agent's redirect does not deliver containers' IMDS traffic: " + strings.Join(r.Node.Problems, "; ")
		r.Fixes = []string{"run the node agent of this version (it sends to a node address, not REDIRECT), with " +
			"--interfaces matching this node's container interfaces and --node-address an address of this node"}
		r.ExitCode = ExitNodeAgent
	case r.Token.TimedOut || (r.Token.Error != "" && r.V1Get.Status != 0):
		r.Diagnosis = "hop-limit symptom: the connection opens but the IMDSv2 token response never arrives. " +
			"IMDS sends it with IP TTL = the hop limit, and this namespace is more hops away. AWS SDKs here " +
			"wait on this timeout and fall back to IMDSv1"
		if r.TokensRequired {
			r.Diagnosis += "; tokens are required, so they get no credentials at all"
		}
		r.Fixes = hopLimitFixes
		r.ExitCode = ExitHopLimit
	case r.Token.Status == http.StatusOK && r.V2Get != nil && r.V2Get.Status == http.StatusOK && r.Role != nil && r.Role.Status != http.StatusOK:
		r.Diagnosis = fmt.Sprintf("IMDSv2 works, but imds-proxy (%s) serves the workload's own role (%s) and has no credentials of it: "+
			"its source fails, so the role path answers %s, as IMDS does where no role is attached", r.Proxy, r.Role.Served, roleStatus(r.Role))
		r.Fixes = []string{"read the sidecar's log (\"cannot be had from its source\" names the cause) and imds_proxy_workload_role_failures_total",
			"check the source the sidecar's environment names: the ECS agent (169.254.170.2), the EKS Pod Identity agent (169.254.170.23) or STS (IRSA)"}
		r.ExitCode = ExitWorkloadRole
	case r.Token.Status == http.StatusOK && r.V2Get != nil && r.V2Get.Status == http.StatusOK:
		r.Diagnosis = "healthy: IMDSv2 works"
		if r.Proxy != "" {
			r.Diagnosis += ", answered by imds-proxy (" + r.Proxy + ")"
		}
		if r.Role != nil {
			r.Diagnosis += ", which serves the workload's own role " + r.Role.Name + " (" + r.Role.Served + "), never the instance's"
		}
		r.ExitCode = ExitHealthy
	case r.Token.Status == http.StatusOK && r.V2Get != nil:
		// The token was issued; what failed is the metadata request carrying it.
		r.Diagnosis, r.Fixes, r.ExitCode = metadataRefused(r)
	case r.Token.Status != 0:
		r.Diagnosis = fmt.Sprintf("IMDS refuses IMDSv2 tokens here (HTTP %d to the token request)", r.Token.Status)
		r.ExitCode = ExitV2Refused
	default:
		r.Diagnosis = "IMDSv2 is not working here: " + r.Token.Error
		r.ExitCode = ExitV2Unavailable
	}
	return r
}

// roleStatus names the role probe's outcome: its HTTP status or its error.
func roleStatus(r *RoleProbe) string {
	if r.Status != 0 {
		return fmt.Sprintf("HTTP %d", r.Status)
	}
	return r.Error
}

// metadataRefused diagnoses a token that was issued but a metadata GET
// carrying it that did not succeed.
func metadataRefused(r Report) (string, []string, int) {
	get := r.V2Get
	who := "IMDS"
	if r.Proxy != "" {
		who = "imds-proxy (" + r.Proxy + ")"
	}
	switch {
	case get.Status == http.StatusUnauthorized:
		return fmt.Sprintf("%s issued an IMDSv2 token but refused it on the next request (HTTP 401 to GET /latest/meta-data/): "+
				"the token is bound to a different caller address, or something between rewrites the request", who),
			[]string{"check for a proxy or NAT between this namespace and " + r.Endpoint + " that changes the source address between requests"},
			ExitV2Refused
	case get.Status == http.StatusForbidden:
		return fmt.Sprintf("%s issues IMDSv2 tokens but forbids the metadata (HTTP 403 to GET /latest/meta-data/): "+
				"a path policy (imds-proxy --deny-path or --allow-path) refuses it", who),
			[]string{"check the proxy's --allow-path and --deny-path"}, ExitV2Refused
	case get.Status != 0:
		return fmt.Sprintf("%s issues IMDSv2 tokens, but the metadata request with one failed (HTTP %d to GET /latest/meta-data/)", who, get.Status),
			nil, ExitV2Unavailable
	}
	return fmt.Sprintf("%s issues IMDSv2 tokens, but the metadata request with one did not complete (GET /latest/meta-data/ failed: %s)", who, get.Error),
		nil, ExitV2Unavailable
}
