package deploy

import (
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

const (
	nodeDaemonSetID = "DaemonSet imds-proxy/imds-proxy-node"
	// serviceAccountDir is where client-go's in-cluster configuration
	// reads the token, the CA and the namespace.
	serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"
)

// baseNodeDaemonSet is the DaemonSet of deploy/kubernetes/node as built.
func baseNodeDaemonSet(t *testing.T) appsv1.DaemonSet {
	t.Helper()
	var ds appsv1.DaemonSet
	builtObject(t, kustomizeBuild(t, filepath.Join(kubernetesDir, "node")), nodeDaemonSetID, &ds)
	return ds
}

func containerNamed(t *testing.T, spec corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("the pod has no container %q", name)
	return corev1.Container{}
}

// hasRule: one of rules grants exactly verb on resource in group.
func hasRule(rules []rbacv1.PolicyRule, group, resource, verb string) bool {
	return slices.ContainsFunc(rules, func(r rbacv1.PolicyRule) bool {
		return slices.Contains(r.APIGroups, group) && slices.Contains(r.Resources, resource) && slices.Contains(r.Verbs, verb)
	})
}

// TestNodeWithMetrics: deploy/kubernetes/node-with-metrics is the node
// agent unchanged plus kube-rbac-proxy in its pod, which serves the
// agent's loopback /metrics, and only /metrics, with TLS on the node IP,
// with its own API credentials (the agent's container still has none),
// RBAC to review tokens and access, a ClusterRole for scrapers, and a
// headless Service over the proxy's port.
func TestNodeWithMetrics(t *testing.T) {
	build := kustomizeBuild(t, filepath.Join(kubernetesDir, "node-with-metrics"))
	var ds appsv1.DaemonSet
	builtObject(t, build, nodeDaemonSetID, &ds)
	var sa corev1.ServiceAccount
	builtObject(t, build, "ServiceAccount imds-proxy/imds-proxy-node", &sa)
	var proxyRole, readerRole rbacv1.ClusterRole
	builtObject(t, build, "ClusterRole imds-proxy-node-kube-rbac-proxy", &proxyRole)
	builtObject(t, build, "ClusterRole imds-proxy-metrics-reader", &readerRole)
	var binding rbacv1.ClusterRoleBinding
	builtObject(t, build, "ClusterRoleBinding imds-proxy-node-kube-rbac-proxy", &binding)
	var svc corev1.Service
	builtObject(t, build, "Service imds-proxy/imds-proxy-node-metrics", &svc)

	spec := ds.Spec.Template.Spec
	base := baseNodeDaemonSet(t)
	if len(spec.Containers) != 2 {
		t.Fatalf("%d containers, want the agent and kube-rbac-proxy", len(spec.Containers))
	}
	// The agent itself is exactly the base's; the pod mounts its service
	// account's token, as the base's does, and kube-rbac-proxy uses it too.
	agent := containerNamed(t, spec, "imds-proxy")
	if want := containerNamed(t, base.Spec.Template.Spec, "imds-proxy"); !equality.Semantic.DeepEqual(agent, want) {
		t.Errorf("the agent container differs from ../node's:\n%s\nwant:\n%s", toYAML(agent), toYAML(want))
	}
	if !isTrue(spec.AutomountServiceAccountToken) || spec.ServiceAccountName != sa.Name {
		t.Errorf("pod automountServiceAccountToken %v, service account %q: want the token of %s mounted", spec.AutomountServiceAccountToken, spec.ServiceAccountName, sa.Name)
	}
	metricsListen := mustFlag(t, "node agent", agent.Args, "metrics-listen")

	krp := containerNamed(t, spec, "kube-rbac-proxy")
	if !strings.HasPrefix(krp.Image, "quay.io/brancz/kube-rbac-proxy:v") {
		t.Errorf("kube-rbac-proxy image %q", krp.Image)
	}
	// It forwards to the agent's loopback listener, and only /metrics:
	// /v1-callers, /readyz and /healthz stay on loopback.
	if up := mustFlag(t, "kube-rbac-proxy", krp.Args, "upstream"); up != "http://"+metricsListen+"/" {
		t.Errorf("--upstream=%s, want http://%s/ (the agent's --metrics-listen)", up, metricsListen)
	}
	if paths := mustFlag(t, "kube-rbac-proxy", krp.Args, "allow-paths"); paths != "/metrics" {
		t.Errorf("--allow-paths=%s, want exactly /metrics", paths)
	}
	if _, ok := flagValue(krp.Args, "ignore-paths"); ok {
		t.Error("--ignore-paths lets requests through without authentication")
	}
	if v := mustFlag(t, "kube-rbac-proxy", krp.Args, "tls-min-version"); v != "VersionTLS12" && v != "VersionTLS13" {
		t.Errorf("--tls-min-version=%s", v)
	}
	// It listens on the node IP (status.podIP of a hostNetwork pod) at the
	// port it declares as https.
	listen := mustFlag(t, "kube-rbac-proxy", krp.Args, "secure-listen-address")
	host, p, err := net.SplitHostPort(listen)
	if err != nil {
		t.Fatalf("--secure-listen-address=%s: %v", listen, err)
	}
	if host != "$(IP)" || !slices.ContainsFunc(krp.Env, func(e corev1.EnvVar) bool {
		return e.Name == "IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP"
	}) {
		t.Errorf("--secure-listen-address=%s, env %s: want [$(IP)]:port with IP from status.podIP", listen, toYAML(krp.Env))
	}
	httpsPort, _ := strconv.Atoi(p)
	if len(krp.Ports) != 1 || krp.Ports[0].Name != "https" || int(krp.Ports[0].ContainerPort) != httpsPort || krp.Ports[0].HostPort != krp.Ports[0].ContainerPort {
		t.Errorf("kube-rbac-proxy ports %s: want https = %d (hostPort = containerPort)", toYAML(krp.Ports), httpsPort)
	}
	sc := krp.SecurityContext
	if sc == nil || !isTrue(sc.RunAsNonRoot) || sc.RunAsUser == nil || *sc.RunAsUser == 0 {
		t.Errorf("kube-rbac-proxy securityContext %s: want a non-root user", toYAML(sc))
	}
	checkMinimalPrivileges(t, "kube-rbac-proxy", krp)

	// The API credentials: the pod's automatically mounted token, which
	// no container shadows with a volume of its own.
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		for _, m := range c.VolumeMounts {
			if m.MountPath == serviceAccountDir {
				t.Errorf("container %s mounts %s over the pod's service account token", c.Name, m.Name)
			}
		}
	}

	// RBAC: kube-rbac-proxy may review tokens and access, and that is all;
	// the binding gives it to the pod's service account.
	if !hasRule(proxyRole.Rules, "authentication.k8s.io", "tokenreviews", "create") ||
		!hasRule(proxyRole.Rules, "authorization.k8s.io", "subjectaccessreviews", "create") || len(proxyRole.Rules) != 2 {
		t.Errorf("ClusterRole %s rules %s: want exactly create tokenreviews and subjectaccessreviews", proxyRole.Name, toYAML(proxyRole.Rules))
	}
	for _, r := range proxyRole.Rules {
		if !slices.Equal(r.Verbs, []string{"create"}) || len(r.Resources) != 1 {
			t.Errorf("ClusterRole %s rule %s: more than create on one resource", proxyRole.Name, toYAML(r))
		}
	}
	if binding.RoleRef != (rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: proxyRole.Name}) ||
		!slices.Equal(binding.Subjects, []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa.Name, Namespace: sa.Namespace}}) {
		t.Errorf("ClusterRoleBinding %s: %s, want %s bound to ServiceAccount %s/%s", binding.Name, toYAML(binding), proxyRole.Name, sa.Namespace, sa.Name)
	}
	// Scrapers: get on /metrics, nothing else (not /v1-callers).
	if want := []rbacv1.PolicyRule{{NonResourceURLs: []string{"/metrics"}, Verbs: []string{"get"}}}; !equality.Semantic.DeepEqual(readerRole.Rules, want) {
		t.Errorf("ClusterRole %s rules %s, want %s", readerRole.Name, toYAML(readerRole.Rules), toYAML(want))
	}

	// The Service: headless, over the pods, at kube-rbac-proxy's port.
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("Service clusterIP %q, want None (headless: each node is its own target)", svc.Spec.ClusterIP)
	}
	if len(svc.Spec.Selector) == 0 || !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("Service selector %v does not select the node agent's pods %v", svc.Spec.Selector, ds.Spec.Template.Labels)
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Name != "https" || int(svc.Spec.Ports[0].Port) != httpsPort ||
		(svc.Spec.Ports[0].TargetPort != intstr.FromString("https") && svc.Spec.Ports[0].TargetPort != intstr.FromInt(httpsPort)) {
		t.Errorf("Service ports %s: want https -> kube-rbac-proxy's %d", toYAML(svc.Spec.Ports), httpsPort)
	}
	if svc.Namespace != ds.Namespace {
		t.Errorf("Service in %q, DaemonSet in %q", svc.Namespace, ds.Namespace)
	}

	// Nothing else about the base changes.
	want := base.DeepCopy()
	want.Spec.Template.Spec.Containers = spec.Containers
	want.Spec.Template.Spec.Volumes = spec.Volumes
	if !equality.Semantic.DeepEqual(ds, *want) {
		t.Errorf("the overlay changes more of the DaemonSet than its containers and volumes:\n%s", toYAML(ds))
	}
	// And the base's volumes are all still there.
	for _, bv := range base.Spec.Template.Spec.Volumes {
		if got := volume(t, spec, bv.Name); !equality.Semantic.DeepEqual(got, bv) {
			t.Errorf("volume %s changed: %s", bv.Name, toYAML(got))
		}
	}
	// kube-rbac-proxy does not publish the agent's own admin port on the
	// node IP by another route: its upstream is loopback, checked above,
	// and the agent's admin listener is still loopback.
	if u, err := url.Parse("http://" + metricsListen); err != nil || u.Hostname() != "127.0.0.1" {
		t.Errorf("the agent's --metrics-listen=%s is not loopback", metricsListen)
	}
}

// TestCiliumLocalRedirectPolicy: deploy/kubernetes/cilium is the node agent
// unchanged plus a CiliumLocalRedirectPolicy (decoded strictly into the
// fields of Cilium's API) that sends 169.254.169.254:80/TCP to the agent's
// pods on each node, at the port the agent listens on and declares as a
// container port: Cilium makes its backends from the selected pods'
// addresses and declared container ports.
func TestCiliumLocalRedirectPolicy(t *testing.T) {
	build := kustomizeBuild(t, filepath.Join(kubernetesDir, "cilium"))
	var ds appsv1.DaemonSet
	builtObject(t, build, nodeDaemonSetID, &ds)
	var lrp ciliumLocalRedirectPolicy
	builtObject(t, build, "CiliumLocalRedirectPolicy imds-proxy/imds-proxy-node", &lrp)

	if base := baseNodeDaemonSet(t); !equality.Semantic.DeepEqual(ds, base) {
		t.Errorf("the overlay changes the node agent's DaemonSet:\n%s", toYAML(ds))
	}
	if lrp.APIVersion != "cilium.io/v2" || lrp.Kind != "CiliumLocalRedirectPolicy" {
		t.Errorf("%s %s", lrp.APIVersion, lrp.Kind)
	}
	// The policy is namespaced, and selects backends in its own namespace.
	if lrp.Namespace != ds.Namespace {
		t.Errorf("policy in namespace %q, the agent in %q: Cilium selects backends in the policy's namespace only", lrp.Namespace, ds.Namespace)
	}

	// Frontend: IMDS, exactly.
	fe := lrp.Spec.RedirectFrontend
	if fe.ServiceMatcher != nil || fe.AddressMatcher == nil {
		t.Fatalf("redirectFrontend %s: want an addressMatcher only", toYAML(fe))
	}
	if ip := net.ParseIP(fe.AddressMatcher.IP); ip == nil || !ip.Equal(net.IPv4(169, 254, 169, 254)) {
		t.Errorf("frontend ip %q, want 169.254.169.254", fe.AddressMatcher.IP)
	}
	if ports := fe.AddressMatcher.ToPorts; len(ports) != 1 || ports[0].Port != "80" || ports[0].Protocol != "TCP" {
		t.Errorf("frontend toPorts %s, want 80/TCP alone", toYAML(ports))
	}

	// Backend: the agent's pods, at its IMDS listener.
	be := lrp.Spec.RedirectBackend
	sel, err := metav1.LabelSelectorAsSelector(&be.LocalEndpointSelector)
	if err != nil {
		t.Fatal(err)
	}
	if sel.Empty() || !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("localEndpointSelector %s does not select the agent's pods %v", toYAML(be.LocalEndpointSelector), ds.Spec.Template.Labels)
	}
	if sel.Matches(labels.Set{"app.kubernetes.io/part-of": "imds-proxy", "app.kubernetes.io/name": "imds-proxy-webhook"}) {
		t.Error("localEndpointSelector also selects the webhook's pods")
	}
	c := containerNamed(t, ds.Spec.Template.Spec, "imds-proxy")
	listen := port(t, mustFlag(t, "node agent", c.Args, "listen"))
	if len(be.ToPorts) != 1 || be.ToPorts[0].Port != strconv.Itoa(int(listen)) || be.ToPorts[0].Protocol != "TCP" {
		t.Fatalf("backend toPorts %s, want %d/TCP (the agent's --listen)", toYAML(be.ToPorts), listen)
	}
	if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool {
		return p.ContainerPort == listen && (p.Protocol == "" || p.Protocol == corev1.ProtocolTCP) &&
			(be.ToPorts[0].Name == "" || strings.EqualFold(be.ToPorts[0].Name, p.Name))
	}) {
		t.Errorf("the agent declares no container port %d/TCP named %q (ports %s): Cilium would find no backend", listen, be.ToPorts[0].Name, toYAML(c.Ports))
	}
	// The backend is a hostNetwork pod (its address is the node's), and
	// the agent must be ready before it is one: Cilium only selects Ready
	// pods, and the readiness probe is the agent's /readyz.
	if !ds.Spec.Template.Spec.HostNetwork {
		t.Error("the agent is not on the host network: its own IMDS requests would be one hop further away")
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Errorf("readinessProbe %s: want /readyz", toYAML(c.ReadinessProbe))
	}
	// skipRedirectFromBackend cannot exempt a hostNetwork backend (it is
	// keyed on a Cilium endpoint's network namespace), and is immutable:
	// leave it unset or false.
	if s := lrp.Spec.SkipRedirectFromBackend; s != nil && *s {
		t.Error("skipRedirectFromBackend: true does nothing for a hostNetwork backend (no Cilium endpoint)")
	}
}
