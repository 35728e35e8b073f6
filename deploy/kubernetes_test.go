package deploy

import (
	"encoding/json"
	"net"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/imds-proxy/imds-proxy/inject"
	"github.com/imds-proxy/imds-proxy/webhook"
)

// proxyShutdownTimeout is the default --shutdown-timeout of imds-proxy
// sidecar and node: how long it drains after SIGTERM.
const proxyShutdownTimeout = 10 * time.Second

// flagValue is the value of --name=value in args (the last one wins, as
// for the flag package), and whether it is there at all.
func flagValue(args []string, name string) (string, bool) {
	value, found := "", false
	for _, a := range args {
		for _, prefix := range []string{"--" + name + "=", "-" + name + "="} {
			if v, ok := strings.CutPrefix(a, prefix); ok {
				value, found = v, true
			}
		}
	}
	return value, found
}

// mustFlag is flagValue, failing the test if the flag is missing.
func mustFlag(t *testing.T, where string, args []string, name string) string {
	t.Helper()
	v, ok := flagValue(args, name)
	if !ok {
		t.Fatalf("%s: no --%s=... in %q", where, name, args)
	}
	return v
}

// port is the port of a host:port address.
func port(t *testing.T, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	n, err := strconv.ParseInt(p, 10, 32)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return int32(n)
}

func toYAML(v any) string {
	out, err := yaml.Marshal(v)
	if err != nil {
		return err.Error()
	}
	return string(out)
}

func deployment(t *testing.T, base, key string) appsv1.Deployment {
	t.Helper()
	var d appsv1.Deployment
	builtObject(t, kustomizeBuild(t, filepath.Join(kubernetesDir, base)), key, &d)
	return d
}

func volume(t *testing.T, spec corev1.PodSpec, name string) corev1.Volume {
	t.Helper()
	for _, v := range spec.Volumes {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("the pod has no volume %q", name)
	return corev1.Volume{}
}

// runAsUser is a container's UID as the kubelet sets it, if the manifest
// sets one.
func runAsUser(spec corev1.PodSpec, c corev1.Container) (int64, bool) {
	if c.SecurityContext != nil && c.SecurityContext.RunAsUser != nil {
		return *c.SecurityContext.RunAsUser, true
	}
	if spec.SecurityContext != nil && spec.SecurityContext.RunAsUser != nil {
		return *spec.SecurityContext.RunAsUser, true
	}
	return 0, false
}

func isTrue(b *bool) bool  { return b != nil && *b }
func isFalse(b *bool) bool { return b != nil && !*b }

// checkMinimalPrivileges: not privileged, no escalation, read-only root
// filesystem, every capability dropped and exactly add added.
func checkMinimalPrivileges(t *testing.T, where string, c corev1.Container, add ...corev1.Capability) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Errorf("%s: no securityContext.capabilities", where)
		return
	}
	if isTrue(sc.Privileged) {
		t.Errorf("%s: privileged", where)
	}
	if !isFalse(sc.AllowPrivilegeEscalation) {
		t.Errorf("%s: allowPrivilegeEscalation is not false", where)
	}
	if !isTrue(sc.ReadOnlyRootFilesystem) {
		t.Errorf("%s: readOnlyRootFilesystem is not true", where)
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("%s: capabilities.drop %v, want [ALL]", where, sc.Capabilities.Drop)
	}
	if got := slices.Sorted(slices.Values(sc.Capabilities.Add)); !slices.Equal(got, add) {
		t.Errorf("%s: capabilities.add %v, want %v", where, got, add)
	}
}

// checkAppContainers: the app containers leave the proxy's ports alone and,
// if uid is given, do not run as the UID whose traffic is exempt.
func checkAppContainers(t *testing.T, spec corev1.PodSpec, exemptUID *int64) {
	t.Helper()
	if len(spec.Containers) == 0 {
		t.Fatal("the pod has no app container")
	}
	for _, c := range spec.Containers {
		if c.Name == inject.ContainerName {
			t.Errorf("app container named %s", c.Name)
		}
		for _, p := range c.Ports {
			if p.ContainerPort == int32(inject.DefaultOptions().Port) || p.ContainerPort == int32(inject.DefaultOptions().MetricsPort) {
				t.Errorf("app container %s uses port %d, the proxy's", c.Name, p.ContainerPort)
			}
		}
		if exemptUID == nil {
			continue
		}
		uid, ok := runAsUser(spec, c)
		if !ok || uid == *exemptUID {
			t.Errorf("app container %s: runAsUser %d (set: %v); it must be set and not %d, whose traffic bypasses the proxy", c.Name, uid, ok, *exemptUID)
		}
	}
	if spec.HostNetwork {
		t.Error("an example app pod with hostNetwork: a sidecar would redirect the node's IMDS traffic")
	}
}

// TestSidecarIsTheInjectedOne: the native sidecar of deploy/kubernetes/sidecar,
// as kustomize builds it, is exactly inject.Container(inject.DefaultOptions())
// as the first init container, with exactly inject.RunVolume().
func TestSidecarIsTheInjectedOne(t *testing.T) {
	d := deployment(t, "sidecar", "Deployment default/example-app")
	spec := d.Spec.Template.Spec
	if len(spec.InitContainers) == 0 {
		t.Fatal("no init containers")
	}
	want := apiSidecar(t)
	if got := spec.InitContainers[0]; !equality.Semantic.DeepEqual(got, want) {
		t.Errorf("first init container:\n%s\nwant inject.Container(inject.DefaultOptions()):\n%s", toYAML(got), toYAML(want))
	}
	if got, want := volume(t, spec, inject.RunVolumeName), apiRunVolume(t); !equality.Semantic.DeepEqual(got, want) {
		t.Errorf("volume:\n%s\nwant inject.RunVolume():\n%s", toYAML(got), toYAML(want))
	}
	// What the comments promise, checked on the real container too.
	c := spec.InitContainers[0]
	if c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Error("the sidecar is not a native sidecar (restartPolicy Always)")
	}
	if c.StartupProbe == nil || c.StartupProbe.HTTPGet == nil || c.StartupProbe.HTTPGet.Path != "/readyz" {
		t.Error("no startup probe on /readyz to hold the app back")
	}
	checkMinimalPrivileges(t, "sidecar", c, "NET_ADMIN", "NET_RAW")
	checkImage(t, "sidecar", c.Image)
	checkAppContainers(t, spec, nil)
}

// TestSidecarInit: in deploy/kubernetes/sidecar-init the rules init
// container runs first as root with NET_ADMIN and NET_RAW and exempts the
// UID the sidecar runs as; the sidecar has no capabilities, runs as that
// UID, does not install rules, listens where the redirect points, and has
// the injected sidecar's probes, ports and resources.
func TestSidecarInit(t *testing.T) {
	d := deployment(t, "sidecar-init", "Deployment default/example-app")
	spec := d.Spec.Template.Spec
	if len(spec.InitContainers) != 2 {
		t.Fatalf("%d init containers, want 2 (rules, then the sidecar)", len(spec.InitContainers))
	}
	rules, sidecar := spec.InitContainers[0], spec.InitContainers[1]
	injected := apiSidecar(t)

	// The rules container: a one-shot init container.
	if rules.Name != "imds-proxy-rules" || rules.RestartPolicy != nil {
		t.Errorf("first init container %q (restartPolicy %v): want imds-proxy-rules, running to completion", rules.Name, rules.RestartPolicy)
	}
	if len(rules.Args) < 2 || rules.Args[0] != "rules" || rules.Args[1] != "install" {
		t.Errorf("rules container args %q: want rules install ...", rules.Args)
	}
	if mode := mustFlag(t, "rules", rules.Args, "mode"); mode != "sidecar" {
		t.Errorf("rules --mode=%s, want sidecar", mode)
	}
	if mark := mustFlag(t, "rules", rules.Args, "exempt-mark"); mark != "0" {
		t.Errorf("rules --exempt-mark=%s, want 0: the unprivileged proxy cannot mark its sockets", mark)
	}
	if uid, ok := runAsUser(spec, rules); !ok || uid != 0 {
		t.Errorf("rules container runs as %d (set: %v), want root", uid, ok)
	}
	checkMinimalPrivileges(t, "rules container", rules, "NET_ADMIN", "NET_RAW")
	checkImage(t, "rules container", rules.Image)
	if !slices.ContainsFunc(rules.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.MountPath == "/run" && volume(t, spec, m.Name).EmptyDir != nil
	}) {
		t.Error("rules container: no emptyDir at /run for the xtables lock")
	}

	// The sidecar: unprivileged, as the exempt UID.
	if sidecar.Name != inject.ContainerName || sidecar.RestartPolicy == nil || *sidecar.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Errorf("second init container %q: want the native sidecar %s (restartPolicy Always)", sidecar.Name, inject.ContainerName)
	}
	exemptUID, err := strconv.ParseInt(mustFlag(t, "rules", rules.Args, "exempt-uid"), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	uid, ok := runAsUser(spec, sidecar)
	if !ok || uid != exemptUID || uid != 1337 {
		t.Errorf("sidecar runs as %d (set: %v); the rules exempt UID %d; want both 1337, the image's user", uid, ok, exemptUID)
	}
	sc := sidecar.SecurityContext
	if sc == nil || !isTrue(sc.RunAsNonRoot) || sc.RunAsGroup == nil || *sc.RunAsGroup != 1337 {
		t.Errorf("sidecar securityContext %s: want runAsNonRoot and runAsGroup 1337", toYAML(sc))
	}
	checkMinimalPrivileges(t, "sidecar", sidecar)
	checkImage(t, "sidecar", sidecar.Image)
	// Its arguments are the injected sidecar's, plus --rules=false.
	if got, want := slices.DeleteFunc(slices.Clone(sidecar.Args), func(a string) bool { return a == "--rules=false" }), injected.Args; len(got) != len(sidecar.Args)-1 || !slices.Equal(got, want) {
		t.Errorf("sidecar args %q: want %q plus --rules=false", sidecar.Args, want)
	}
	if p, want := port(t, mustFlag(t, "sidecar", sidecar.Args, "listen")), mustFlag(t, "rules", rules.Args, "port"); strconv.Itoa(int(p)) != want {
		t.Errorf("the rules redirect to port %s, the sidecar listens on %d", want, p)
	}
	for name, pair := range map[string][2]any{
		"startupProbe":  {sidecar.StartupProbe, injected.StartupProbe},
		"livenessProbe": {sidecar.LivenessProbe, injected.LivenessProbe},
		"resources":     {sidecar.Resources, injected.Resources},
		"ports":         {sidecar.Ports, injected.Ports},
	} {
		if !equality.Semantic.DeepEqual(pair[0], pair[1]) {
			t.Errorf("sidecar %s:\n%s\nwant the injected sidecar's:\n%s", name, toYAML(pair[0]), toYAML(pair[1]))
		}
	}
	if !equality.Semantic.DeepEqual(volume(t, spec, inject.RunVolumeName), apiRunVolume(t)) {
		t.Errorf("volume %s is not inject.RunVolume()", inject.RunVolumeName)
	}
	checkAppContainers(t, spec, &exemptUID)
}

// TestNodeDaemonSet: the node agent runs on every node in the host network
// namespace with only the capabilities iptables needs, redirects from the
// interfaces of the common CNIs, rolls without surge, shuts down within its
// grace period, and is probed on /readyz and /healthz on its admin
// listener, which is on loopback only: not published as a port, not
// announced for scraping (../node-with-metrics does that, through
// kube-rbac-proxy).
func TestNodeDaemonSet(t *testing.T) {
	build := kustomizeBuild(t, filepath.Join(kubernetesDir, "node"))
	var ds appsv1.DaemonSet
	builtObject(t, build, "DaemonSet imds-proxy/imds-proxy-node", &ds)
	var sa corev1.ServiceAccount
	builtObject(t, build, "ServiceAccount imds-proxy/imds-proxy-node", &sa)
	spec := ds.Spec.Template.Spec

	if !spec.HostNetwork || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("hostNetwork %v, dnsPolicy %q: want the host network with ClusterFirstWithHostNet", spec.HostNetwork, spec.DNSPolicy)
	}
	// The agent reads the pods of its node from the API server, with its
	// service account's token, and finds the process behind a connection
	// in the host's PID namespace.
	if spec.ServiceAccountName != sa.Name || isFalse(sa.AutomountServiceAccountToken) || !isTrue(spec.AutomountServiceAccountToken) {
		t.Errorf("service account %q (automount %v, pod %v): want %s with its token mounted", spec.ServiceAccountName, sa.AutomountServiceAccountToken, spec.AutomountServiceAccountToken, sa.Name)
	}
	if !spec.HostPID {
		t.Error("no hostPID: the agent cannot find the process behind a connection in the host's /proc")
	}
	if !slices.ContainsFunc(spec.Tolerations, func(tol corev1.Toleration) bool {
		return tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == ""
	}) {
		t.Errorf("tolerations %s: want one that tolerates every taint", toYAML(spec.Tolerations))
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", spec.PriorityClassName)
	}
	u := ds.Spec.UpdateStrategy
	if u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil ||
		u.RollingUpdate.MaxUnavailable == nil || *u.RollingUpdate.MaxUnavailable != intstr.FromInt32(1) ||
		(u.RollingUpdate.MaxSurge != nil && *u.RollingUpdate.MaxSurge != intstr.FromInt32(0)) {
		t.Errorf("updateStrategy %s: want RollingUpdate, maxUnavailable 1, no surge", toYAML(u))
	}
	if g := spec.TerminationGracePeriodSeconds; g == nil || time.Duration(*g)*time.Second <= proxyShutdownTimeout {
		t.Errorf("terminationGracePeriodSeconds %v: want more than the proxy's %v shutdown", g, proxyShutdownTimeout)
	}

	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	checkImage(t, "node agent", c.Image)
	if len(c.Args) == 0 || c.Args[0] != "node" {
		t.Errorf("args %q: want node ...", c.Args)
	}
	// --node-name needs the build with the Kubernetes source.
	if !slices.Equal(c.Command, []string{"/usr/local/bin/imds-proxy-kubernetes"}) || mustFlag(t, "node agent", c.Args, "node-name") != "$(NODE_NAME)" {
		t.Errorf("command %q, --node-name %q: want the image's imds-proxy-kubernetes, with $(NODE_NAME)", c.Command, mustFlag(t, "node agent", c.Args, "node-name"))
	}
	interfaces := strings.Split(mustFlag(t, "node agent", c.Args, "interfaces"), ",")
	for _, want := range []string{"eni+", "cali+", "lxc+", "cni0", "docker0", "veth+", "cni+", "br-+"} {
		if !slices.Contains(interfaces, want) {
			t.Errorf("--interfaces %v lacks %s", interfaces, want)
		}
	}
	for _, uplink := range []string{"eth+", "eth0", "ens+", "en+", "lo", "+"} {
		if slices.Contains(interfaces, uplink) {
			t.Errorf("--interfaces %v trusts %s, the node's own or uplink interface", interfaces, uplink)
		}
	}
	// --node-name is the node the pod runs on, from the downward API.
	if v := mustFlag(t, "node agent", c.Args, "node-name"); v != "$(NODE_NAME)" ||
		!slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
			return e.Name == "NODE_NAME" && e.Value == "" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName"
		}) {
		t.Errorf("--node-name=%s, env %s: want $(NODE_NAME) with NODE_NAME from spec.nodeName", v, toYAML(c.Env))
	}
	checkNodeRBAC(t, build, sa)
	apiPort := port(t, mustFlag(t, "node agent", c.Args, "listen"))
	metricsListen := mustFlag(t, "node agent", c.Args, "metrics-listen")
	metricsPort := port(t, metricsListen)
	if apiPort != 8169 || metricsPort != 9169 {
		t.Errorf("ports %d and %d, want 8169 and 9169", apiPort, metricsPort)
	}
	// The admin listener serves /v1-callers (every IMDSv1 caller's address
	// and User-Agent): loopback only, never the node's addresses, which
	// pods and the VPC reach.
	if host, _, _ := net.SplitHostPort(metricsListen); host != "127.0.0.1" {
		t.Errorf("--metrics-listen=%s: want 127.0.0.1:%d, out of reach of pods and the VPC", metricsListen, metricsPort)
	}
	if len(c.Ports) != 1 || c.Ports[0].Name != "imds" || c.Ports[0].ContainerPort != apiPort || c.Ports[0].HostPort != apiPort ||
		(c.Ports[0].Protocol != "" && c.Ports[0].Protocol != corev1.ProtocolTCP) {
		t.Errorf("ports %s: want only imds = %d/TCP (hostPort = containerPort with hostNetwork), nothing for the loopback admin listener", toYAML(c.Ports), apiPort)
	}
	if uid, ok := runAsUser(spec, c); !ok || uid != 0 {
		t.Errorf("runs as %d (set: %v), want root (the image's user is 1337)", uid, ok)
	}
	// SYS_PTRACE: reading other processes' namespace and descriptor links
	// in the host's /proc (hostPID).
	checkMinimalPrivileges(t, "node agent", c, "NET_ADMIN", "NET_RAW", "SYS_PTRACE")
	if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.MountPath == "/run" && volume(t, spec, m.Name).EmptyDir != nil
	}) {
		t.Error("no emptyDir at /run for the xtables lock")
	}
	for name, c := range map[string]struct {
		probe *corev1.Probe
		path  string
	}{
		"startupProbe":   {c.StartupProbe, "/readyz"},
		"readinessProbe": {c.ReadinessProbe, "/readyz"},
		"livenessProbe":  {c.LivenessProbe, "/healthz"},
	} {
		// The kubelet probes from the host network namespace, which this
		// pod shares: httpGet.host 127.0.0.1 reaches the loopback
		// listener (without host it would probe the node IP).
		if c.probe == nil || c.probe.HTTPGet == nil || c.probe.HTTPGet.Path != c.path || c.probe.HTTPGet.Port != intstr.FromInt32(metricsPort) ||
			c.probe.HTTPGet.Host != "127.0.0.1" || (c.probe.HTTPGet.Scheme != "" && c.probe.HTTPGet.Scheme != corev1.URISchemeHTTP) {
			t.Errorf("%s %s: want httpGet http://127.0.0.1:%d%s", name, toYAML(c.probe), metricsPort, c.path)
		}
	}
	wantResources := corev1.ResourceRequirements{
		Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("24Mi")},
		Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
	}
	if !equality.Semantic.DeepEqual(c.Resources, wantResources) {
		t.Errorf("resources %s, want %s", toYAML(c.Resources), toYAML(wantResources))
	}
	for k := range ds.Spec.Template.Annotations {
		if strings.HasPrefix(k, "prometheus.io/") {
			t.Errorf("pod annotation %s: nothing on the pod IP (the node IP) is scrapeable; see ../node-with-metrics", k)
		}
	}
	if !labels.SelectorFromSet(ds.Spec.Selector.MatchLabels).Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Error("the selector does not match the pod template")
	}
}

// webhookBuild is the webhook base with the cert-manager component, as the
// webhook-with-cert-manager overlay builds it.
type webhookBuild struct {
	deployment appsv1.Deployment
	service    corev1.Service
	mwc        admissionregistrationv1.MutatingWebhookConfiguration
	cert       certificate // the serving certificate
	caCert     certificate // the CA that signs it
	caIssuer   issuer      // issues with that CA
	selfSigned issuer      // issues the CA
}

func buildWebhook(t *testing.T) webhookBuild {
	t.Helper()
	build := kustomizeBuild(t, filepath.Join(kubernetesDir, "webhook-with-cert-manager"))
	var w webhookBuild
	builtObject(t, build, "Deployment imds-proxy/imds-proxy-webhook", &w.deployment)
	builtObject(t, build, "Service imds-proxy/imds-proxy-webhook", &w.service)
	builtObject(t, build, "MutatingWebhookConfiguration imds-proxy", &w.mwc)
	builtObject(t, build, "Certificate imds-proxy/imds-proxy-webhook", &w.cert)
	builtObject(t, build, "Certificate imds-proxy/imds-proxy-webhook-ca", &w.caCert)
	builtObject(t, build, "Issuer imds-proxy/imds-proxy-ca", &w.caIssuer)
	builtObject(t, build, "Issuer imds-proxy/imds-proxy-selfsigned", &w.selfSigned)
	return w
}

// issuedBy: the certificate's issuerRef names the Issuer i, in its
// namespace.
func issuedBy(c certificate, i issuer) bool {
	ref := c.Spec.IssuerRef
	return ref.Name == i.Name && ref.Kind == "Issuer" && (ref.Group == "" || ref.Group == "cert-manager.io") && c.Namespace == i.Namespace
}

// certDurations are a certificate's duration and renewBefore, failing the
// test unless 0 < renewBefore < duration.
func certDurations(t *testing.T, c certificate) (duration, renewBefore time.Duration) {
	t.Helper()
	duration, err1 := time.ParseDuration(c.Spec.Duration)
	renewBefore, err2 := time.ParseDuration(c.Spec.RenewBefore)
	if err1 != nil || err2 != nil || renewBefore <= 0 || renewBefore >= duration {
		t.Errorf("certificate %s: duration %q, renewBefore %q: want 0 < renewBefore < duration", c.Name, c.Spec.Duration, c.Spec.RenewBefore)
	}
	return duration, renewBefore
}

// TestWebhookDeployment: the webhook server runs unprivileged, injects the
// same image everything else runs, serves its TLS files from the Secret
// the certificate is written to, on the port its Service and probes use.
func TestWebhookDeployment(t *testing.T) {
	w := buildWebhook(t)
	d, spec := w.deployment, w.deployment.Spec.Template.Spec
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
		t.Errorf("replicas %v, want 2", d.Spec.Replicas)
	}
	if !isFalse(spec.AutomountServiceAccountToken) || spec.ServiceAccountName != "imds-proxy-webhook" {
		t.Errorf("service account %q, automount %v: want imds-proxy-webhook without a token", spec.ServiceAccountName, spec.AutomountServiceAccountToken)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	checkImage(t, "webhook", c.Image)
	if len(c.Args) == 0 || c.Args[0] != "webhook" {
		t.Errorf("args %q: want webhook ...", c.Args)
	}
	checkImage(t, "webhook --image", mustFlag(t, "webhook", c.Args, "image"))
	metricsPort := port(t, mustFlag(t, "webhook", c.Args, "metrics-listen"))
	if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.ContainerPort == metricsPort }) {
		t.Errorf("ports %+v lack the metrics port %d", c.Ports, metricsPort)
	}
	for k, v := range map[string]string{"prometheus.io/scrape": "true", "prometheus.io/port": strconv.Itoa(int(metricsPort)), "prometheus.io/path": "/metrics"} {
		if got := d.Spec.Template.Annotations[k]; got != v {
			t.Errorf("pod annotation %s: %q, want %q", k, got, v)
		}
	}
	if uid, ok := runAsUser(spec, c); !ok || uid != 1337 {
		t.Errorf("runs as %d (set: %v), want 1337", uid, ok)
	}
	if c.SecurityContext == nil || !isTrue(c.SecurityContext.RunAsNonRoot) {
		t.Error("runAsNonRoot is not true")
	}
	checkMinimalPrivileges(t, "webhook", c)

	// TLS: both files come from the certificate's Secret.
	mounts := map[string]string{} // mount path -> secret
	for _, m := range c.VolumeMounts {
		if v := volume(t, spec, m.Name); v.Secret != nil {
			mounts[m.MountPath] = v.Secret.SecretName
			if v.Secret.DefaultMode == nil || *v.Secret.DefaultMode&0o007 != 0 {
				t.Errorf("secret volume %s: defaultMode %v lets others read the key", m.Name, v.Secret.DefaultMode)
			}
		}
	}
	for _, f := range []string{"tls-cert", "tls-key"} {
		file := mustFlag(t, "webhook", c.Args, f)
		if secret := mounts[path.Dir(file)]; secret != w.cert.Spec.SecretName {
			t.Errorf("--%s=%s is in secret %q, want the certificate's %q", f, file, secret, w.cert.Spec.SecretName)
		}
	}

	listen := port(t, mustFlag(t, "webhook", c.Args, "listen"))
	if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.ContainerPort == listen && p.Name == "https" }) {
		t.Errorf("container ports %s: want https = %d", toYAML(c.Ports), listen)
	}
	for name, p := range map[string]*corev1.Probe{"readinessProbe": c.ReadinessProbe, "livenessProbe": c.LivenessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Scheme != corev1.URISchemeHTTPS || p.HTTPGet.Path != "/healthz" || p.HTTPGet.Port != intstr.FromInt32(listen) {
			t.Errorf("%s %s: want HTTPS /healthz on %d", name, toYAML(p), listen)
		}
	}

	s := w.service
	if len(s.Spec.Ports) != 1 || s.Spec.Ports[0].Port != 443 {
		t.Fatalf("service ports %s: want 443", toYAML(s.Spec.Ports))
	}
	if target := s.Spec.Ports[0].TargetPort; target != intstr.FromString("https") && target != intstr.FromInt32(listen) {
		t.Errorf("service targetPort %s: want the container's https port %d", target.String(), listen)
	}
	if !labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(d.Spec.Template.Labels)) || len(s.Spec.Selector) == 0 {
		t.Error("the service does not select the webhook pods")
	}
}

// TestWebhookConfiguration: both webhooks send pod CREATEs to the Service
// at webhook.InjectPath with the agreed settings, and the caBundle comes
// from the cert-manager serving Certificate, issued for the Service's
// names by a CA Issuer whose CA Certificate a self-signed Issuer issues:
// the caBundle (the serving Secret's ca.crt) is that CA, which stays the
// same when the serving certificate renews.
func TestWebhookConfiguration(t *testing.T) {
	w := buildWebhook(t)
	if len(w.mwc.Webhooks) != 2 {
		t.Fatalf("%d webhooks, want 2 (gen-certs.sh patches indices 0 and 1)", len(w.mwc.Webhooks))
	}
	wantRules := []admissionregistrationv1.RuleWithOperations{{
		Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
		Rule: admissionregistrationv1.Rule{
			APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"},
			Scope: ptr(admissionregistrationv1.NamespacedScope),
		},
	}}
	// A webhook that refuses violations fails closed too: with Ignore a pod
	// would escape the policy whenever the webhook is down.
	onViolation := mustFlag(t, "webhook", w.deployment.Spec.Template.Spec.Containers[0].Args, "on-violation")
	wantFailure := map[string]admissionregistrationv1.FailurePolicyType{"warn": admissionregistrationv1.Ignore, "deny": admissionregistrationv1.Fail}[onViolation]
	if wantFailure == "" {
		t.Errorf("webhook --on-violation=%s: want warn or deny", onViolation)
	}
	for _, h := range w.mwc.Webhooks {
		where := h.Name
		if !equality.Semantic.DeepEqual(h.Rules, wantRules) {
			t.Errorf("%s: rules %s, want %s", where, toYAML(h.Rules), toYAML(wantRules))
		}
		svc := h.ClientConfig.Service
		if svc == nil || svc.Namespace != w.service.Namespace || svc.Name != w.service.Name ||
			svc.Path == nil || *svc.Path != webhook.InjectPath || svc.Port == nil || *svc.Port != w.service.Spec.Ports[0].Port {
			t.Errorf("%s: clientConfig %s: want service %s/%s:%d%s", where, toYAML(h.ClientConfig), w.service.Namespace, w.service.Name, w.service.Spec.Ports[0].Port, webhook.InjectPath)
		}
		if h.ClientConfig.URL != nil || len(h.ClientConfig.CABundle) != 0 {
			t.Errorf("%s: clientConfig has a url or a caBundle", where)
		}
		if !slices.Equal(h.AdmissionReviewVersions, []string{"v1"}) {
			t.Errorf("%s: admissionReviewVersions %v", where, h.AdmissionReviewVersions)
		}
		if h.SideEffects == nil || *h.SideEffects != admissionregistrationv1.SideEffectClassNone {
			t.Errorf("%s: sideEffects %v", where, h.SideEffects)
		}
		if h.TimeoutSeconds == nil || *h.TimeoutSeconds != 5 {
			t.Errorf("%s: timeoutSeconds %v", where, h.TimeoutSeconds)
		}
		if h.ReinvocationPolicy == nil || *h.ReinvocationPolicy != admissionregistrationv1.NeverReinvocationPolicy {
			t.Errorf("%s: reinvocationPolicy %v", where, h.ReinvocationPolicy)
		}
		if h.FailurePolicy == nil || *h.FailurePolicy != wantFailure {
			t.Errorf("%s: failurePolicy %v, want %s with --on-violation=%s", where, h.FailurePolicy, wantFailure, onViolation)
		}
	}

	// cert-manager: the annotated Certificate is the serving one, for the
	// Service's names, into the Secret the webhook reads (checked in
	// TestWebhookDeployment).
	c, ca := w.cert, w.caCert
	if got, want := w.mwc.Annotations["cert-manager.io/inject-ca-from"], c.Namespace+"/"+c.Name; got != want {
		t.Errorf("cert-manager.io/inject-ca-from %q, want %q", got, want)
	}
	host := w.service.Name + "." + w.service.Namespace + ".svc"
	if want := []string{host, host + ".cluster.local"}; !slices.Equal(c.Spec.DNSNames, want) {
		t.Errorf("dnsNames %v, want %v", c.Spec.DNSNames, want)
	}
	if !slices.Contains(c.Spec.Usages, "server auth") {
		t.Errorf("usages %v lack server auth", c.Spec.Usages)
	}
	// The chain: self-signed Issuer -> CA Certificate -> CA Issuer ->
	// serving Certificate. A self-signed serving certificate would be its
	// own CA: the caBundle would change at every renewal, before the pods
	// serve the new certificate.
	if !issuedBy(c, w.caIssuer) || w.caIssuer.Spec.CA == nil || w.caIssuer.Spec.SelfSigned != nil {
		t.Errorf("serving certificate issuerRef %+v: want the CA Issuer %s/%s (spec.ca %+v)", c.Spec.IssuerRef, w.caIssuer.Namespace, w.caIssuer.Name, w.caIssuer.Spec.CA)
	}
	if w.caIssuer.Spec.CA == nil || w.caIssuer.Spec.CA.SecretName != ca.Spec.SecretName || w.caIssuer.Namespace != ca.Namespace {
		t.Errorf("CA Issuer %s spec.ca %+v: want the secret %q of the CA Certificate %s", w.caIssuer.Name, w.caIssuer.Spec.CA, ca.Spec.SecretName, ca.Name)
	}
	if !issuedBy(ca, w.selfSigned) || w.selfSigned.Spec.SelfSigned == nil || w.selfSigned.Spec.CA != nil {
		t.Errorf("CA certificate issuerRef %+v: want the self-signed Issuer %s/%s", ca.Spec.IssuerRef, w.selfSigned.Namespace, w.selfSigned.Name)
	}
	if !ca.Spec.IsCA || c.Spec.IsCA {
		t.Errorf("isCA: CA certificate %v, serving certificate %v; want true, false", ca.Spec.IsCA, c.Spec.IsCA)
	}
	if ca.Spec.CommonName == "" || len(ca.Spec.DNSNames) != 0 {
		t.Errorf("CA certificate commonName %q, dnsNames %v: want a name and no DNS names", ca.Spec.CommonName, ca.Spec.DNSNames)
	}
	if ca.Spec.SecretName == "" || ca.Spec.SecretName == c.Spec.SecretName {
		t.Errorf("CA secret %q, serving secret %q: want two secrets", ca.Spec.SecretName, c.Spec.SecretName)
	}

	duration, _ := certDurations(t, c)
	caDuration, caRenewBefore := certDurations(t, ca)
	// A serving certificate issued just before the CA renews still ends
	// before the CA does, and the CA lasts many serving renewals.
	if caRenewBefore < duration || caDuration < 5*duration {
		t.Errorf("CA duration %v, renewBefore %v; serving duration %v: want the CA to renew at least one serving duration before it expires, and to last many", caDuration, caRenewBefore, duration)
	}
	for _, cert := range []certificate{c, ca} {
		if pk := cert.Spec.PrivateKey; pk == nil || !slices.Contains([]string{"RSA", "ECDSA", "Ed25519"}, pk.Algorithm) || !slices.Contains([]string{"Never", "Always"}, pk.RotationPolicy) {
			t.Errorf("certificate %s: privateKey %+v: want a cert-manager algorithm and rotation policy", cert.Name, pk)
		}
	}
	// The CA keeps its key when it renews: the new CA certificate, same
	// subject and key, also verifies serving certificates the old one
	// signed, so the caBundle can switch to it at once.
	if pk := ca.Spec.PrivateKey; pk == nil || pk.RotationPolicy != "Never" {
		t.Errorf("CA certificate privateKey %+v: want rotationPolicy Never", pk)
	}
}

// TestWebhookSelectors evaluates both webhooks' namespace and object
// selectors on the opt-in and opt-out combinations: each pod is sent at
// most once, and exactly where the labels say. An opted-out pod of an
// opted-in namespace is sent too: the webhook decides whether it may opt
// out (--allow-opt-out-namespaces), not a label its author sets.
func TestWebhookSelectors(t *testing.T) {
	w := buildWebhook(t)
	const byNamespace, byPod = "namespace.inject.imds-proxy.io", "pod.inject.imds-proxy.io"
	enabled := map[string]string{inject.InjectKey: inject.Enabled}
	disabled := map[string]string{inject.InjectKey: inject.Disabled}
	for _, c := range []struct {
		namespace string
		nsLabels  map[string]string
		podLabels map[string]string
		want      string // the webhook that gets the pod, or ""
	}{
		{"shop", enabled, nil, byNamespace},
		{"shop", enabled, map[string]string{"app": "web"}, byNamespace},
		{"shop", enabled, enabled, byNamespace},
		{"shop", enabled, disabled, byNamespace},
		{"shop", nil, enabled, byPod},
		{"shop", map[string]string{inject.InjectKey: "someday"}, enabled, byPod},
		{"shop", nil, nil, ""},
		{"shop", nil, disabled, ""},
		{"shop", disabled, enabled, ""},
		{"shop", disabled, nil, ""},
		{"kube-system", nil, enabled, ""},
		{"imds-proxy", nil, enabled, ""},
		{"imds-proxy", nil, nil, ""},
	} {
		ns := labels.Set{"kubernetes.io/metadata.name": c.namespace} // set by the API server on every namespace
		for k, v := range c.nsLabels {
			ns[k] = v
		}
		var got []string
		for _, h := range w.mwc.Webhooks {
			if matches(t, h.NamespaceSelector, ns) && matches(t, h.ObjectSelector, labels.Set(c.podLabels)) {
				got = append(got, h.Name)
			}
		}
		var want []string
		if c.want != "" {
			want = []string{c.want}
		}
		if !slices.Equal(got, want) {
			t.Errorf("namespace %s %v, pod %v: sent to %v, want %v", c.namespace, c.nsLabels, c.podLabels, got, want)
		}
	}
}

// TestWebhookRecognisesTheExampleSidecars: the pods of deploy/kubernetes's
// sidecar and sidecar-init examples, as the webhook would see them with
// --on-violation=deny and the webhook Deployment's --exempt-uid, already
// have exactly the sidecar and
// no container that could bypass it: admitted unchanged, without a word.
// A copy whose app runs as the exempt UID is refused.
func TestWebhookRecognisesTheExampleSidecars(t *testing.T) {
	o := inject.DefaultOptions()
	o.Policy = inject.Policy{V1Floor: "allow", OnViolation: inject.Deny}
	uid, err := strconv.ParseInt(mustFlag(t, "webhook", buildWebhook(t).deployment.Spec.Template.Spec.Containers[0].Args, "exempt-uid"), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	o.ExemptUID = uid // the webhook Deployment's: the sidecar-init example must be its variant
	for _, base := range []string{"sidecar", "sidecar-init"} {
		d := deployment(t, base, "Deployment default/example-app")
		pod := corev1.Pod{ObjectMeta: d.Spec.Template.ObjectMeta, Spec: d.Spec.Template.Spec}
		a, err := inject.PodPatch(podJSON(t, pod), d.Namespace, o)
		if err != nil || a.Outcome != inject.Skipped || a.Patch != nil || a.Reason != "" || len(a.Warnings) != 0 {
			t.Errorf("%s: %+v, err %v; want it skipped as already injected, without a word", base, a, err)
		}
		if base != "sidecar-init" {
			continue
		}
		uid := int64(1337)
		pod.Spec.Containers[0].SecurityContext.RunAsUser = &uid
		if a, err := inject.PodPatch(podJSON(t, pod), d.Namespace, o); err != nil || a.Outcome != inject.Denied ||
			!strings.Contains(a.Reason, "container app can become UID 1337") {
			t.Errorf("%s, the app as UID 1337: %+v, err %v; want it refused", base, a, err)
		}
	}
}

func podJSON(t *testing.T, pod corev1.Pod) []byte {
	t.Helper()
	data, err := json.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func matches(t *testing.T, s *metav1.LabelSelector, set labels.Set) bool {
	t.Helper()
	if s == nil {
		return true // the API server's default: everything
	}
	sel, err := metav1.LabelSelectorAsSelector(s)
	if err != nil {
		t.Fatalf("selector %s: %v", toYAML(s), err)
	}
	return sel.Matches(set)
}

func ptr[T any](v T) *T { return &v }

// apiSidecar is inject.Container(inject.DefaultOptions()) as the API server
// reads it: decoded strictly into core/v1.
func apiSidecar(t *testing.T) corev1.Container {
	t.Helper()
	var c corev1.Container
	decodeAPI(t, inject.Container(inject.DefaultOptions()), &c)
	return c
}

// apiRunVolume is inject.RunVolume() decoded strictly into core/v1.
func apiRunVolume(t *testing.T) corev1.Volume {
	t.Helper()
	var v corev1.Volume
	decodeAPI(t, inject.RunVolume(), &v)
	return v
}

func decodeAPI(t *testing.T, v, into any) {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if strict, err := sigsjson.UnmarshalStrict(data, into); err != nil || len(strict) > 0 {
		t.Fatalf("%s does not decode strictly into %T: %v %v", data, into, err, strict)
	}
}

// checkNodeRBAC: the node agent's service account may read what
// workload.Kubernetes reads, and nothing more: get, list and watch pods,
// list and watch namespaces, get service accounts, ReplicaSets and Jobs.
// (workload's tests run the source against a real API server as this
// service account, with these manifests applied.)
func checkNodeRBAC(t *testing.T, build map[string][]byte, sa corev1.ServiceAccount) {
	t.Helper()
	var role rbacv1.ClusterRole
	builtObject(t, build, "ClusterRole imds-proxy-node", &role)
	var binding rbacv1.ClusterRoleBinding
	builtObject(t, build, "ClusterRoleBinding imds-proxy-node", &binding)
	want := []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"serviceaccounts"}, Verbs: []string{"get"}},
		{APIGroups: []string{"apps"}, Resources: []string{"replicasets"}, Verbs: []string{"get"}},
		{APIGroups: []string{"batch"}, Resources: []string{"jobs"}, Verbs: []string{"get"}},
	}
	if !equality.Semantic.DeepEqual(role.Rules, want) {
		t.Errorf("ClusterRole %s rules:\n%s\nwant exactly:\n%s", role.Name, toYAML(role.Rules), toYAML(want))
	}
	if binding.RoleRef != (rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name}) ||
		!slices.Equal(binding.Subjects, []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa.Name, Namespace: sa.Namespace}}) {
		t.Errorf("ClusterRoleBinding %s: %s, want %s bound to ServiceAccount %s/%s", binding.Name, toYAML(binding), role.Name, sa.Namespace, sa.Name)
	}
}
