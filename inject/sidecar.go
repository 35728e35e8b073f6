// Package inject adds the imds-proxy sidecar to workload definitions:
// Kubernetes manifests (a YAML stream), single pods (JSONPatch, for the
// admission webhook) and ECS task definitions. Every path builds the sidecar
// from the same Options, and the example manifests in deploy/ are tested
// against it.
package inject

import (
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

const (
	// ContainerName names the sidecar. A pod or task that has a container
	// of this name gets no other; unless that container is exactly the
	// sidecar, that is a violation of the Policy.
	ContainerName = "imds-proxy"
	// MetricsPortName names the sidecar's admin port, which the chart's
	// PodMonitor of the sidecars scrapes in every namespace.
	MetricsPortName = "imds-metrics"
	// RunVolumeName is the emptyDir mounted at /run: iptables-legacy takes
	// its lock there, and the root filesystem stays read-only.
	RunVolumeName = "imds-proxy-run"
	// TokenKeyFile is where the Kubernetes sidecar keeps the key that
	// signs its clients' tokens (--token-key-file): in the memory-backed
	// emptyDir at /run, which outlives restarts of the sidecar container
	// (so its clients' tokens do) and goes with the pod.
	TokenKeyFile = "/run/imds-proxy-token-key"
	// DefaultImage is the image the sidecar runs unless Options.Image says
	// otherwise. Build and push your own with `make image IMAGE=...`.
	DefaultImage = "ghcr.io/imds-proxy/imds-proxy:0.1.0"

	// InjectKey is the label (namespaces, pods) that opts in to the webhook
	// with the value "enabled", and the annotation or label that opts a pod
	// out with "disabled", in the webhook and in `imds-proxy inject`.
	InjectKey = "imds-proxy.io/inject"
	// V1Key is a pod annotation that sets the sidecar's --v1 policy for that
	// workload (auto, allow, warn or block), within Policy.V1Floor.
	V1Key = imdsapi.V1Key

	// Enabled and Disabled are the values of InjectKey.
	Enabled  = "enabled"
	Disabled = "disabled"
)

// Options choose what the injected sidecar runs.
type Options struct {
	Image       string
	Port        int // API port on 127.0.0.1 and [::1], the redirect target
	MetricsPort int // /metrics, /healthz, /readyz on the pod IP (kubelet probes)
	V1          imdsapi.V1Policy
	Upstream    string // empty: the proxy's default, IMDS itself
	// ExemptUID is the UID whose traffic the rules of the sidecar-init
	// variant (deploy/kubernetes/sidecar-init) let past the redirect. A
	// pod's variant is its sidecar only if it exempts this UID: whoever runs
	// as the exempt UID reaches IMDS directly, so the operator chooses it,
	// never the pod's author. 0: no variant is the sidecar.
	ExemptUID int64
	Policy    Policy // what a pod's own choices may not override
	// Credentials is the sidecar's --credentials: CredentialsWorkload runs
	// the image's imds-proxy-workload-role build (WorkloadRoleCommand). If
	// empty, the instance's role (a pod's CredentialsKey annotation, or
	// inject ecs --credentials, chooses the workload's).
	Credentials imdsapi.Credentials
	// WorkloadRoleARN is the sidecar's --workload-role-arn: an ECS task
	// definition's taskRoleArn. If empty, none.
	WorkloadRoleARN string
	// source is what the sidecar needs of a pod's own credential source
	// (IRSA, Pod Identity), copied from its app containers by forPod.
	source credentialSource
}

// WorkloadRoleCommand is the image's build that can serve a workload's own
// role (--credentials=workload), with the AWS SDK's credential providers.
const WorkloadRoleCommand = "/usr/local/bin/imds-proxy-workload-role"

// credentialSource is the environment and mounts of a pod's own credential
// source: IRSA's AWS_ROLE_ARN and token file, Pod Identity's agent URI and
// token file, and the region; what the EKS webhook adds to each container.
type credentialSource struct {
	env    []EnvVar
	mounts []VolumeMount
}

// credentialSourceVariables are the variables copied to the sidecar, in
// this order, from the first app container that names a source.
var credentialSourceVariables = []string{"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
	"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_STS_REGIONAL_ENDPOINTS"}

// The token directories the EKS webhook mounts (IRSA's, Pod Identity's),
// and the Pod Identity agent's URIs. A pod's author writes its containers'
// environment and mounts: the sidecar, which runs as root with NET_ADMIN,
// takes nothing else from them, so that a mount cannot put the author's
// files in its path or libraries, nor a URI send its requests elsewhere.
var (
	tokenDirs              = []string{"/var/run/secrets/eks.amazonaws.com/serviceaccount", "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount"}
	podIdentityAgentPrefix = []string{"http://169.254.170.23/", "http://[fd00:ec2::23]/"}
)

// credentialSourceOf is the credential source of the pod's first app
// container that names one with values (never valueFrom), and the mounts
// of its token directories, which must be projected service account
// tokens; none, and why, if that source is not exactly what the EKS
// webhook adds. None, and no reason, if no app container names one yet
// (the EKS webhook, when it runs after this one, adds it to the sidecar too).
func credentialSourceOf(spec *podSpec) (credentialSource, string) {
	for _, c := range spec.Containers {
		values := map[string]string{}
		for _, e := range c.Env {
			if len(e.ValueFrom) == 0 {
				values[e.Name] = e.Value
			}
		}
		tokenFiles := []string{values["AWS_WEB_IDENTITY_TOKEN_FILE"], values["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]}
		if tokenFiles[0] == "" && values["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == "" {
			continue
		}
		if uri := values["AWS_CONTAINER_CREDENTIALS_FULL_URI"]; uri != "" &&
			!slices.ContainsFunc(podIdentityAgentPrefix, func(p string) bool { return strings.HasPrefix(uri, p) }) {
			return credentialSource{}, "container " + c.Name + "'s AWS_CONTAINER_CREDENTIALS_FULL_URI is not the EKS Pod Identity agent's"
		}
		var src credentialSource
		for _, file := range tokenFiles {
			if file == "" {
				continue
			}
			dir := file[:strings.LastIndex(file, "/")+1]
			i := slices.IndexFunc(c.VolumeMounts, func(m VolumeMount) bool { return strings.TrimSuffix(m.MountPath, "/")+"/" == dir })
			if !slices.Contains(tokenDirs, strings.TrimSuffix(dir, "/")) || i < 0 || !projectedToken(spec, c.VolumeMounts[i].Name) {
				return credentialSource{}, "container " + c.Name + "'s token file " + file + " is not in a projected service account token " +
					"volume at " + strings.Join(tokenDirs, " or ")
			}
			src.mounts = append(src.mounts, VolumeMount{Name: c.VolumeMounts[i].Name, ReadOnly: true, MountPath: c.VolumeMounts[i].MountPath})
		}
		for _, name := range credentialSourceVariables {
			if v, ok := values[name]; ok {
				src.env = append(src.env, EnvVar{Name: name, Value: v})
			}
		}
		return src, ""
	}
	return credentialSource{}, ""
}

// projectedToken says whether the pod's volume name holds only projected
// service account tokens.
func projectedToken(spec *podSpec, name string) bool {
	i := slices.IndexFunc(spec.Volumes, func(v podVolume) bool { return v.Name == name })
	if i < 0 {
		return false
	}
	var v struct {
		Projected *struct {
			Sources []map[string]json.RawMessage `json:"sources"`
		} `json:"projected"`
	}
	if json.Unmarshal(spec.Volumes[i].raw, &v) != nil || v.Projected == nil || len(v.Projected.Sources) == 0 {
		return false
	}
	for _, source := range v.Projected.Sources {
		if _, ok := source["serviceAccountToken"]; !ok || len(source) != 1 {
			return false
		}
	}
	return true
}

// DefaultOptions are the sidecar of the example manifests; 1337 is the UID
// the sidecar-init example exempts and runs its proxy as (the image's user).
func DefaultOptions() Options {
	return Options{Image: DefaultImage, Port: imdsapi.ProxyPort, MetricsPort: imdsapi.AdminPort, V1: imdsapi.V1Auto, ExemptUID: 1337}
}

// Validate reports options the sidecar could not start with, by the names of
// the flags that set them (inject, webhook).
func (o Options) Validate() error {
	if o.Image == "" {
		return fmt.Errorf("--image must not be empty")
	}
	for _, p := range []struct {
		flag string
		port int
	}{{"--port", o.Port}, {"--metrics-port", o.MetricsPort}} {
		if p.port < 1 || p.port > 65535 {
			return fmt.Errorf("%s %d: must be 1..65535", p.flag, p.port)
		}
	}
	if o.Port == o.MetricsPort {
		return fmt.Errorf("--port and --metrics-port are both %d", o.Port)
	}
	if _, err := imdsapi.ParseV1Policy(string(o.V1)); err != nil {
		return fmt.Errorf("--v1: %w", err)
	}
	if o.Upstream != "" {
		if u, err := url.Parse(o.Upstream); err != nil || u.Scheme != "http" || u.Host == "" {
			return fmt.Errorf("--upstream %q: must be http://host[:port]", o.Upstream)
		}
	}
	if o.Credentials != "" {
		if _, err := imdsapi.ParseCredentials(string(o.Credentials)); err != nil {
			return fmt.Errorf("--credentials: %w", err)
		}
	}
	if o.ExemptUID < 0 {
		return fmt.Errorf("--exempt-uid %d: want the UID the sidecar-init variant exempts, or 0 for no variant", o.ExemptUID)
	}
	return o.Policy.validate()
}

// withFloor is o with the IMDSv1 floor it enforces: Policy.V1Floor, or V1
// where the operator set none. Without a floor of its own, a pod's
// annotation could loosen the operator's --v1 (to allow, say); the
// operator who wants pods to choose looser policies sets a lower floor.
func (o Options) withFloor() Options {
	if o.Policy.V1Floor == "" {
		o.Policy.V1Floor = o.V1
	}
	return o
}

// args are the sidecar's command-line arguments, with its admin endpoints
// on metricsHost.
func (o Options) args(metricsHost string) []string {
	args := []string{
		string(imdsapi.ModeSidecar),
		"--listen=127.0.0.1:" + strconv.Itoa(o.Port),
		"--metrics-listen=" + metricsHost + ":" + strconv.Itoa(o.MetricsPort),
		"--v1=" + string(o.V1),
	}
	if o.Upstream != "" {
		args = append(args, "--upstream="+o.Upstream)
	}
	if o.Credentials == imdsapi.CredentialsWorkload {
		args = append(args, "--credentials="+string(o.Credentials))
		if o.WorkloadRoleARN != "" {
			args = append(args, "--workload-role-arn="+o.WorkloadRoleARN)
		}
	}
	return args
}

// Container is the Kubernetes native sidecar (an init container that keeps
// running, Kubernetes >= 1.29). Its startup probe holds back the pod's other
// containers until the redirect exists; it holds only the capabilities
// iptables needs (NET_RAW for the legacy backend), runs as root for them,
// and is stopped after the app containers, removing its rules last.
func Container(o Options) ContainerSpec {
	root, no, yes := int64(0), false, true
	c := ContainerSpec{
		Name:          ContainerName,
		Image:         o.Image,
		Args:          append(o.args(""), "--token-key-file="+TokenKeyFile), // probes come from the kubelet, to the pod IP
		Ports:         []ContainerPort{{Name: MetricsPortName, ContainerPort: int32(o.MetricsPort), Protocol: "TCP"}},
		Resources:     &Resources{Limits: map[string]string{"memory": "64Mi"}, Requests: map[string]string{"cpu": "10m", "memory": "24Mi"}},
		RestartPolicy: "Always",
		VolumeMounts:  []VolumeMount{{Name: RunVolumeName, MountPath: "/run"}},
		LivenessProbe: probe("/healthz", int32(o.MetricsPort), 10, 3),
		StartupProbe:  probe("/readyz", int32(o.MetricsPort), 1, 60),
		SecurityContext: &SecurityContext{
			Capabilities:             &Capabilities{Add: []string{"NET_ADMIN", "NET_RAW"}, Drop: []string{"ALL"}},
			Privileged:               &no,
			RunAsUser:                &root,
			RunAsNonRoot:             &no,
			ReadOnlyRootFilesystem:   &yes,
			AllowPrivilegeEscalation: &no,
		},
	}
	if o.Credentials == imdsapi.CredentialsWorkload {
		c.Command = []string{WorkloadRoleCommand}
		c.Env = o.source.env
		c.VolumeMounts = append(c.VolumeMounts, o.source.mounts...)
	}
	return c
}

// RunVolume is the pod volume the sidecar mounts at /run.
func RunVolume() VolumeSpec {
	return VolumeSpec{Name: RunVolumeName, EmptyDir: &EmptyDir{Medium: "Memory", SizeLimit: "1Mi"}}
}

func probe(path string, port, period, failures int32) *Probe {
	return &Probe{HTTPGet: &HTTPGetAction{Path: path, Port: port}, PeriodSeconds: period, TimeoutSeconds: 1, FailureThreshold: failures}
}
