package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/iptables"
	"github.com/imds-proxy/imds-proxy/proxy"
	"github.com/imds-proxy/imds-proxy/workload"
)

// defaultInterfaces are the container-facing interfaces of common setups:
// Docker's default and user-defined bridges, CNI bridges, the host veths of
// the VPC CNI, Calico and Cilium, and other veth pairs.
const defaultInterfaces = "docker0,br-+,cni+,eni+,cali+,lxc+,veth+"

// ruleFlags describe the iptables redirect; `rules` and the serving
// subcommands share them.
type ruleFlags struct {
	mode        imdsapi.Mode
	exemptMark  uint
	exemptUID   int
	interfaces  string
	nodeAddress string
	backend     string
	ipv6        bool
}

// register adds the flags of f.mode, or of both modes when f.mode is not
// yet known (the rules command, whose --mode is itself a flag).
func (f *ruleFlags) register(fs *flag.FlagSet) {
	if f.mode != imdsapi.ModeSidecar {
		fs.StringVar(&f.interfaces, "interfaces", defaultInterfaces, "node mode: container-facing interfaces whose IMDS traffic is redirected (comma-separated, iptables wildcards with +); the listener is reachable only from these and lo")
		fs.StringVar(&f.nodeAddress, "node-address", iptables.NodeAddressAuto, "node mode: IPv4 address of this node that IMDS traffic from containers is sent to (DNAT); auto: the --listen address if it names one, else the node's source address towards --upstream (on EC2 the primary ENI address)")
	}
	if f.mode != imdsapi.ModeNode {
		fs.UintVar(&f.exemptMark, "exempt-mark", iptables.DefaultExemptMark, "sidecar mode: socket mark on the proxy's upstream connections, exempting them from the redirect where --exempt-cgroup cannot (4457 = 0x1169; setting it needs NET_ADMIN, or only NET_RAW on Linux 5.17+, so app containers can forge it; 0 disables)")
		fs.IntVar(&f.exemptUID, "exempt-uid", -1, "sidecar mode: exempt this UID's connections from the redirect instead, for a proxy without NET_ADMIN whose rules an init container installs; a root app container with CAP_SETUID can take the UID (-1 disables)")
	}
	fs.StringVar(&f.backend, "iptables-backend", string(iptables.BackendAuto), "iptables backend: auto (legacy if legacy tables hold rules, else nft), nft or legacy")
	fs.BoolVar(&f.ipv6, "ipv6", true, "also redirect IMDS over IPv6 (fd00:ec2::254) where ip6tables works")
}

// config is the ruleset configuration for a proxy on port, listening on
// listenHost ("" for every address) and forwarding to upstreamHost.
func (f *ruleFlags) config(port int, listenHost, upstreamHost string) (iptables.Config, error) {
	cfg := iptables.Config{Mode: f.mode, ProxyPort: port, ExemptMark: uint32(f.exemptMark), ExemptUID: f.exemptUID}
	if f.mode == imdsapi.ModeNode {
		cfg.ExemptUID = -1
		for _, name := range strings.Split(f.interfaces, ",") {
			if name = strings.TrimSpace(name); name != "" {
				cfg.Interfaces = append(cfg.Interfaces, name)
			}
		}
		addr, err := iptables.ResolveNodeAddress(f.nodeAddress, listenHost, upstreamHost)
		if err != nil {
			return cfg, err
		}
		if ip, err := netip.ParseAddr(listenHost); err == nil && !ip.IsUnspecified() && ip != addr {
			return cfg, fmt.Errorf("--node-address %s: the redirect would send IMDS traffic there, but --listen %s does not listen on it", addr, listenHost)
		}
		cfg.NodeAddress = addr
	}
	return cfg, cfg.Validate()
}

func (f *ruleFlags) families() []iptables.Family {
	if f.ipv6 {
		return []iptables.Family{iptables.IPv4, iptables.IPv6}
	}
	return []iptables.Family{iptables.IPv4}
}

func (f *ruleFlags) parseBackend() (iptables.Backend, error) {
	b, err := iptables.ParseBackend(f.backend)
	if err != nil {
		return "", fmt.Errorf("--iptables-backend: %w", err)
	}
	return b, nil
}

// serveFlags are the flags of the serving subcommands, sidecar and node.
type serveFlags struct {
	ruleFlags
	listen        string
	metricsListen string
	upstream      string
	v1            string
	v1Floor       string
	// credentials and workloadRoleARN are --credentials and
	// --workload-role-arn (sidecar mode).
	credentials     string
	workloadRoleARN string
	// The workload sources of a node agent: the ECS agent's introspection
	// API and the Docker Engine API ("" for none).
	ecsIntrospection string
	dockerSocket     string
	// The node's name and the API server's credentials, for the
	// Kubernetes source ("" for none; in-cluster credentials).
	nodeName   string
	kubeconfig string
	// proxy holds the flags that are proxy.Config fields, from DefaultConfig.
	proxy           proxy.Config
	shutdownTimeout time.Duration
	rules           bool
	keepRules       bool
	reconcile       time.Duration
	logFormat       string
	logLevel        string
	allowPaths      listFlag
	denyPaths       listFlag
	configFile      string
	cacheUncached   defaultedList
	coalesce        bool
	pprofListen     string
	exemptCgroup    string
	tokenKeyFile    string
	// ownCgroup is the cgroup the sidecar's rules exempt, decided at start
	// (iptables.Exemption.WithOwnCgroup); "" when they exempt a mark or UID.
	ownCgroup string
}

// The values of --exempt-cgroup.
const (
	exemptCgroupAuto = "auto"
	exemptCgroupOff  = "off"
)

// listFlag collects comma-separated values, from repeated flags, a
// comma-separated environment variable, or a YAML list in --config.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(value string) error {
	for _, v := range strings.Split(value, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l = append(*l, v)
		}
	}
	return nil
}

// defaultedList is a listFlag with a default that the first value set
// replaces (rather than adds to).
type defaultedList struct {
	values []string
	set    bool
}

func (d *defaultedList) String() string { return strings.Join(d.values, ",") }

func (d *defaultedList) Set(value string) error {
	if !d.set {
		d.values, d.set = nil, true
	}
	return (*listFlag)(&d.values).Set(value)
}

func (f *serveFlags) register(fs *flag.FlagSet, defaultListen string) {
	fs.StringVar(&f.listen, "listen", defaultListen, "address the IMDS API is served on (the redirect target)")
	fs.StringVar(&f.metricsListen, "metrics-listen", defaultMetricsListen(f.mode), "address of /metrics, /healthz, /readyz and /v1-callers; empty disables it (a node agent's default keeps them off the VPC and the pods)")
	fs.StringVar(&f.upstream, "upstream", imdsapi.Endpoint, "IMDS, or a node agent, that requests are forwarded to (http://host[:port])")
	fs.StringVar(&f.v1, "v1", string(imdsapi.V1Auto), "IMDSv1 (tokenless) requests: auto (follow the upstream: block while it requires tokens or cannot tell, else allow), allow (serve, log, count; where the upstream requires tokens this re-opens IMDSv1, and is logged at warn), warn (serve, and log that block would refuse them) or block (answer 401 as IMDS does when tokens are required); imds_proxy_v1_would_block_total counts what block refuses, under every policy")
	fs.BoolVar(&f.proxy.V1Tokenless, "v1-tokenless", false, "forward the tokenless requests the policy lets through as they came, without the proxy's session token and past the cache, so that the instance counts them in its MetadataNoToken metric (observing before a shutdown); by default they are upgraded to IMDSv2, which works where the instance already requires tokens")
	if f.mode == imdsapi.ModeNode {
		fs.StringVar(&f.v1Floor, "v1-floor", "", "node mode: the loosest IMDSv1 policy a workload may choose for itself (its "+workload.V1Key+" pod or namespace annotation, or container label), in the order allow < warn < auto < block; a workload can only tighten it (default: --v1)")
		fs.StringVar(&f.nodeName, "node-name", "", "node mode: this Kubernetes node's name (the DaemonSet passes spec.nodeName): the agent watches this node's pods and the namespaces, which name each pod's workload and carry its "+workload.V1Key+" annotation (empty: not asked)")
		fs.StringVar(&f.kubeconfig, "kubeconfig", "", "node mode, with --node-name: a kubeconfig file for the Kubernetes API (empty: the pod's own service account)")
		fs.StringVar(&f.ecsIntrospection, "ecs-introspection", "", "node mode: the ECS agent's introspection API (http://localhost:51678 on an ECS instance), which names each container's cluster, task and task definition (empty: not asked)")
		fs.StringVar(&f.dockerSocket, "docker-socket", "", "node mode: the Docker Engine API socket (/var/run/docker.sock), which names each container and its "+workload.V1Key+" label (an ECS task definition's dockerLabels); access to it is root-equivalent on the host (empty: not asked)")
		fs.BoolVar(&f.proxy.GuardOwnIdentity, "guard-own-identity", false, "node mode: answer 404 for the node role's credentials (meta-data/iam/security-credentials/) to workloads with an AWS identity of their own: pods with an IRSA role or EKS Pod Identity, ECS tasks with a task role; the rest of IMDS stays served")
	}
	fs.Var(&f.allowPaths, "allow-path", "only forward paths under these prefixes (comma-separated or repeated; others get 403)")
	fs.Var(&f.denyPaths, "deny-path", "never forward paths under these prefixes, e.g. /latest/user-data,/latest/meta-data/iam/ (403; deny wins over allow)")
	fs.StringVar(&f.tokenKeyFile, "token-key-file", "", "file holding the key that signs clients' tokens, so that they survive restarts and upgrades; created (mode 0600, random key) if absent, refused if open to group or others or owned by another user; its directory must exist (empty: a new random key per process, and a restart makes clients' tokens get 401 once)")
	fs.StringVar(&f.pprofListen, "pprof-listen", "", "address of Go's /debug/pprof/ profiles, for finding where CPU time goes (keep it on loopback; empty disables it)")
	fs.StringVar(&f.configFile, "config", "", "YAML file of flag values (keys are flag names); flags and environment variables win over it")
	f.proxy = proxy.DefaultConfig()
	d := &f.proxy
	fs.BoolVar(&d.UpstreamV1Fallback, "upstream-v1-fallback", d.UpstreamV1Fallback, "while no upstream IMDSv2 token can be had, forward GETs without one (else answer 503)")
	fs.DurationVar(&d.UpstreamTokenTTL, "upstream-token-ttl", d.UpstreamTokenTTL, "lifetime of the proxy's own upstream token (1s..6h); refreshed at half of it")
	fs.DurationVar(&d.UpstreamTokenTimeout, "upstream-token-timeout", d.UpstreamTokenTimeout, "how long to wait for an upstream token response before diagnosing the hop-limit symptom")
	fs.DurationVar(&d.UpstreamRetryMin, "upstream-retry-min", d.UpstreamRetryMin, "first wait before retrying IMDSv2 upstream after a failure (doubles each time)")
	fs.DurationVar(&d.UpstreamRetryMax, "upstream-retry-max", d.UpstreamRetryMax, "longest wait between IMDSv2 retries upstream")
	fs.DurationVar(&d.UpstreamDialTimeout, "upstream-dial-timeout", d.UpstreamDialTimeout, "bound on connecting to the upstream")
	fs.DurationVar(&d.UpstreamResponseTimeout, "upstream-response-timeout", d.UpstreamResponseTimeout, "bound on waiting for upstream response headers")
	fs.DurationVar(&f.shutdownTimeout, "shutdown-timeout", 10*time.Second, "on SIGTERM, how long in-flight requests may take to finish")
	fs.BoolVar(&f.rules, "rules", true, "install the iptables redirect rules before becoming ready, and remove them on exit")
	fs.BoolVar(&f.keepRules, "keep-rules-on-exit", false, "leave the rules in place on exit: IMDS stays unreachable until the proxy is back (fails closed) instead of reachable directly (fails open)")
	fs.DurationVar(&f.reconcile, "reconcile-interval", 30*time.Second, "how often to re-check the rules and restore any deleted")
	fs.StringVar(&f.logFormat, "log-format", "json", "log format: json or console")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error (debug logs every request)")
	if f.mode == imdsapi.ModeSidecar {
		fs.StringVar(&f.credentials, "credentials", string(imdsapi.CredentialsInstance), "sidecar mode: whose role the role path "+
			"(meta-data/iam/security-credentials/, iam/info) serves: instance (the instance's, from IMDS) or workload (the task's or pod's "+
			"own: the ECS task role, EKS Pod Identity or IRSA, whichever the sidecar's environment names, through the AWS SDK's providers; "+
			"never the instance's: while that source fails, the last credentials until 5 minutes before they expire, then 404); "+
			"the imds-proxy-workload-role build")
		fs.StringVar(&f.workloadRoleARN, "workload-role-arn", "", "sidecar mode, with --credentials=workload: the role's ARN, which names "+
			"it in the listing and iam/info where the source does not (an ECS task role, Pod Identity; IRSA's is AWS_ROLE_ARN)")
		fs.StringVar(&f.exemptCgroup, "exempt-cgroup", exemptCgroupAuto, "sidecar mode: auto exempts the proxy's own cgroup from the redirect instead of --exempt-mark/--exempt-uid, which app containers can forge (needs cgroup v2, and Linux 6.1+ in a cgroup namespace; falls back to the mark, with a warning, elsewhere); off always uses the mark or UID")
	}
	f.registerEconomy(fs)
	f.registerLimits(fs)
	f.ruleFlags.register(fs)
}

// registerEconomy adds the flags that spare IMDS's packet budget.
func (f *serveFlags) registerEconomy(fs *flag.FlagSet) {
	c := &f.proxy.Cache
	fs.DurationVar(&c.TTL, "cache-ttl", c.TTL, "serve repeated GETs from memory for this long (0 disables the cache); errors and 401s are never cached")
	fs.DurationVar(&c.StaleTTL, "cache-stale-ttl", c.StaleTTL, "how long past --cache-ttl a cached answer may replace an upstream error (429, 5xx, unreachable)")
	fs.IntVar(&c.MaxEntries, "cache-max-entries", c.MaxEntries, "most answers the cache holds")
	fs.IntVar(&c.MaxBytes, "cache-max-bytes", c.MaxBytes, "most body bytes the cache holds")
	fs.DurationVar(&c.CredentialMargin, "cache-credential-margin", c.CredentialMargin, "never serve cached role credentials later than this before their Expiration")
	f.cacheUncached = defaultedList{values: c.Uncached}
	fs.Var(&f.cacheUncached, "cache-uncached", "path segments whose paths are never cached (comma-separated or repeated; a YAML list in --config): answers that change without notice")
	fs.IntVar(&f.proxy.Retry.Attempts, "upstream-attempts", f.proxy.Retry.Attempts, "most upstream requests per client request: 429, 5xx, refused and reset connections are retried with jittered backoff (1: no retries)")
	fs.BoolVar(&f.coalesce, "coalesce", true, "identical GETs in flight at the same time share one upstream request")
}

// registerLimits adds the bounds on what clients can hold.
func (f *serveFlags) registerLimits(fs *flag.FlagSet) {
	if f.mode == imdsapi.ModeNode {
		f.proxy.Limits = proxy.DefaultNodeServerLimits()
	}
	l := &f.proxy.Limits
	fs.IntVar(&l.MaxConnections, "max-connections", l.MaxConnections, "client connections held at once; more are answered 503 and closed (0: no limit)")
	fs.IntVar(&l.MaxConnectionsPerClient, "max-connections-per-client", l.MaxConnectionsPerClient, "node mode: client connections held at once from one address (one container), so that none can take them all; past it, or past --max-connections, the longest-idle keep-alive connection is closed first (0: no limit; a sidecar's clients all come from 127.0.0.1)")
	fs.DurationVar(&l.ReadHeaderTimeout, "read-header-timeout", l.ReadHeaderTimeout, "close a connection whose request headers take longer (slow clients)")
	fs.DurationVar(&l.IdleTimeout, "idle-timeout", l.IdleTimeout, "close keep-alive connections idle for longer")
	fs.IntVar(&l.MaxHeaderBytes, "max-header-bytes", l.MaxHeaderBytes, "larger request headers are answered 431")
}

func (f *serveFlags) proxyConfig() (proxy.Config, error) {
	upstream, err := url.Parse(f.upstream)
	if err != nil {
		return proxy.Config{}, fmt.Errorf("--upstream: %w", err)
	}
	policy, err := imdsapi.ParseV1Policy(f.v1)
	if err != nil {
		return proxy.Config{}, fmt.Errorf("--v1: %w", err)
	}
	paths, err := proxy.NewPathPolicy(f.allowPaths, f.denyPaths)
	if err != nil {
		return proxy.Config{}, fmt.Errorf("--allow-path/--deny-path: %w", err)
	}
	cfg := f.proxy
	cfg.Upstream, cfg.V1, cfg.Paths, cfg.Mode = upstream, policy, paths, f.mode
	if f.v1Floor != "" {
		if cfg.V1Floor, err = imdsapi.ParseV1Policy(f.v1Floor); err != nil {
			return proxy.Config{}, fmt.Errorf("--v1-floor: %w", err)
		}
	}
	cfg.DisableCoalescing = !f.coalesce
	cfg.Cache.Uncached = nil
	for _, segment := range f.cacheUncached.values {
		if segment = strings.Trim(segment, "/"); segment != "" {
			cfg.Cache.Uncached = append(cfg.Cache.Uncached, segment)
		}
	}
	return cfg, cfg.Validate()
}

// defaultMetricsListen is loopback for a node agent, whose admin listener
// would otherwise be open to the VPC and to every pod (/v1-callers lists
// every pod's addresses); a sidecar's is on the pod IP for the kubelet's
// probes.
func defaultMetricsListen(mode imdsapi.Mode) string {
	if mode == imdsapi.ModeNode {
		return fmt.Sprintf("127.0.0.1:%d", imdsapi.AdminPort)
	}
	return fmt.Sprintf(":%d", imdsapi.AdminPort)
}

// rulesConfig is the ruleset for a proxy listening on --listen. A sidecar
// that exempts its own cgroup exempts nothing else: a mark or UID rule
// beside it would let app containers forge their way past.
func (f *serveFlags) rulesConfig() (iptables.Config, error) {
	listenHost, portText, err := net.SplitHostPort(f.listen)
	if err != nil {
		return iptables.Config{}, fmt.Errorf("--listen %q: %w", f.listen, err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port == 0 {
		return iptables.Config{}, fmt.Errorf("--listen %q: the redirect needs a fixed port", f.listen)
	}
	upstream, err := url.Parse(f.upstream)
	if err != nil {
		return iptables.Config{}, fmt.Errorf("--upstream: %w", err)
	}
	cfg, err := f.config(port, listenHost, upstream.Hostname())
	if err != nil || f.ownCgroup == "" {
		return cfg, err
	}
	cfg.ExemptCgroup, cfg.ExemptMark, cfg.ExemptUID = f.ownCgroup, 0, -1
	return cfg, cfg.Validate()
}

// validate reports bad flag values before anything needs privileges.
func (f *serveFlags) validate() error {
	if _, err := f.proxyConfig(); err != nil {
		return err
	}
	if f.mode == imdsapi.ModeSidecar {
		if _, err := imdsapi.ParseCredentials(f.credentials); err != nil {
			return fmt.Errorf("--credentials: %w", err)
		}
		if f.workloadRoleARN != "" && f.credentials != string(imdsapi.CredentialsWorkload) {
			return errors.New("--workload-role-arn names the role of --credentials=workload, which is not set")
		}
	}
	if f.mode == imdsapi.ModeSidecar && f.exemptCgroup != exemptCgroupAuto && f.exemptCgroup != exemptCgroupOff {
		return fmt.Errorf("--exempt-cgroup %q: want auto or off", f.exemptCgroup)
	}
	if !f.rules {
		return nil
	}
	if _, err := f.parseBackend(); err != nil {
		return err
	}
	_, err := f.rulesConfig()
	return err
}
