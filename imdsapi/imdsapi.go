// Package imdsapi holds the vocabulary that the proxy, its rules, its doctor
// and its injectors share: the Instance Metadata Service's addresses, paths
// and headers, imds-proxy's own headers and ports, where it runs, and its
// IMDSv1 policies. It has no behaviour and imports nothing of this module.
package imdsapi

import (
	"fmt"
	"time"
)

// The IMDS endpoints.
const (
	AddrV4 = "169.254.169.254"
	AddrV6 = "fd00:ec2::254"
	// Endpoint is where SDKs find IMDS by default.
	Endpoint = "http://" + AddrV4
	// TokenPath is where IMDSv2 tokens are issued, to PUT requests only.
	TokenPath = "/latest/api/token"
	// TokenHeader carries a token on metadata requests.
	TokenHeader = "X-Aws-Ec2-Metadata-Token"
	// TokenTTLHeader asks for a token's lifetime, and carries it on the answer.
	TokenTTLHeader = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"
	// ServerName is what IMDS puts in its Server header.
	ServerName = "EC2ws"
)

// imds-proxy's own headers.
const (
	// ProxyHeader on an answer says that an imds-proxy made or passed it,
	// and in which mode.
	ProxyHeader = "X-Imds-Proxy"
	// LoopHeader carries a per-process id on the proxy's upstream requests,
	// so that a request redirected back to its sender is recognised.
	LoopHeader = "X-Imds-Proxy-Id"
	// ProbeHeader marks the proxy's tokenless probe of its upstream's
	// IMDSv1 policy, which a chained imds-proxy answers with its own.
	ProbeHeader = "X-Imds-Proxy-Probe"
	// CredentialsHeader on an answer of the role path says that a proxy
	// answered it from the workload's own role (--credentials=workload),
	// and from which source: "workload; source=irsa".
	CredentialsHeader = "X-Imds-Proxy-Credentials"
	// UserAgent is the User-Agent of the proxy's own upstream requests.
	UserAgent = "imds-proxy"
)

// imds-proxy's default ports.
const (
	// ProxyPort serves the IMDS API, the redirect target.
	ProxyPort = 8169
	// AdminPort serves /metrics, /v1-callers, /healthz and /readyz.
	AdminPort = 9169
)

// Mode is where an imds-proxy runs.
type Mode string

// Modes.
const (
	// ModeSidecar: inside the workload's network namespace.
	ModeSidecar Mode = "sidecar"
	// ModeNode: in the host's network namespace, for every container on it.
	ModeNode Mode = "node"
)

// V1Policy decides what happens to requests that carry no IMDSv2 token.
type V1Policy string

// IMDSv1 policies.
const (
	// V1Auto follows the upstream: it refuses tokenless requests while the
	// upstream does (an instance with HttpTokens=required, or a node agent
	// that blocks them) or while that is not known yet, and allows them
	// otherwise. The proxy is then never weaker than what it stands in for.
	V1Auto V1Policy = "auto"
	// V1Allow forwards tokenless GET and HEAD requests (logged and counted),
	// even where the upstream refuses them: it re-opens IMDSv1 there.
	V1Allow V1Policy = "allow"
	// V1Warn forwards them too, logging that --v1 block would refuse them:
	// the "observe" stage of an IMDSv1 shutdown.
	V1Warn V1Policy = "warn"
	// V1Block answers them 401, as IMDS does when tokens are required.
	V1Block V1Policy = "block"
)

// V1Key is the workload setting that chooses its IMDSv1 policy: a pod or
// namespace annotation, or a container label. The webhook and `inject`
// turn a pod's into its sidecar's --v1; a node agent applies it itself.
const V1Key = "imds-proxy.io/v1"

// Credentials is whose role a sidecar serves on the role path
// (meta-data/iam/security-credentials/ and iam/info): --credentials.
type Credentials string

const (
	// CredentialsInstance forwards the role path: the instance's role.
	CredentialsInstance Credentials = "instance"
	// CredentialsWorkload answers it from the task's or pod's own role
	// (the ECS task role, EKS Pod Identity or IRSA), never the instance's.
	CredentialsWorkload Credentials = "workload"
)

// CredentialsKey is the pod annotation that asks for a sidecar serving the
// pod's own role (value "workload"); the webhook and `inject k8s` turn it
// into the sidecar's --credentials.
const CredentialsKey = "imds-proxy.io/credentials"

// RoleCredentials are a role's credentials, as IMDS serves them under
// meta-data/iam/security-credentials/<role>.
type RoleCredentials struct {
	AccessKeyID, SecretAccessKey, Token string
	Expiration                          time.Time
	// LastUpdated is when they were first served.
	LastUpdated time.Time
}

// ParseCredentials parses the value of --credentials.
func ParseCredentials(s string) (Credentials, error) {
	switch c := Credentials(s); c {
	case CredentialsInstance, CredentialsWorkload:
		return c, nil
	}
	return "", fmt.Errorf("unknown credentials %q: want instance or workload", s)
}

// ParseV1Policy parses the value of --v1.
func ParseV1Policy(s string) (V1Policy, error) {
	switch p := V1Policy(s); p {
	case V1Auto, V1Allow, V1Warn, V1Block:
		return p, nil
	}
	return "", fmt.Errorf("unknown IMDSv1 policy %q: want auto, allow, warn or block", s)
}

// Rank orders IMDSv1 policies by what they refuse. allow and warn refuse
// nothing (warn only logs more), auto refuses what the instance refuses,
// block refuses every tokenless request. So allow < warn < auto < block. An
// auto floor must not accept warn: a proxy answers tokenless requests with
// a token of its own, so warn serves them even where the instance requires
// tokens. A warn floor accepts auto, which loses only warn's "block would
// refuse it" log on instances that allow IMDSv1. ok is false for a value
// that is no policy.
func (p V1Policy) Rank() (rank int, ok bool) {
	switch p {
	case V1Allow:
		return 0, true
	case V1Warn:
		return 1, true
	case V1Auto:
		return 2, true
	case V1Block:
		return 3, true
	}
	return 0, false
}

// AtLeast is p, or floor where p refuses less than floor (or is no policy).
func AtLeast(p, floor V1Policy) V1Policy {
	rank, ok := p.Rank()
	if floorRank, _ := floor.Rank(); !ok || rank < floorRank {
		return floor
	}
	return p
}
