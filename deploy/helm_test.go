package deploy

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/imds-proxy/imds-proxy/inject"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

var chartDir = filepath.Join("helm", "imds-proxy")

// renderChart renders the chart with values as `helm template -n
// imds-proxy` would (schema validation included), and decodes every
// object strictly into its Kubernetes type, by id.
func renderChart(t *testing.T, values map[string]any) (map[string]any, error) {
	t.Helper()
	chrt, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("loading %s: %v", chartDir, err)
	}
	vals, err := util.ToRenderValuesWithSchemaValidation(chrt, values,
		common.ReleaseOptions{Name: "imds-proxy", Namespace: "imds-proxy", IsInstall: true}, common.DefaultCapabilities, false)
	if err != nil {
		return nil, err
	}
	files, err := engine.Render(chrt, vals)
	if err != nil {
		return nil, err
	}
	objects := map[string]any{}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if !strings.HasSuffix(name, ".yaml") {
			continue
		}
		docs, err := splitYAML([]byte(files[name]))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for _, raw := range docs {
			var meta struct {
				metav1.TypeMeta `json:",inline"`
				Metadata        metav1.ObjectMeta `json:"metadata"`
			}
			if err := yaml.Unmarshal(raw, &meta); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			obj, err := decodeRendered(raw, meta.TypeMeta)
			if err != nil {
				t.Errorf("%s: %v\n%s", name, err, raw)
				continue
			}
			objects[id(meta.Kind, meta.Metadata.Namespace, meta.Metadata.Name)] = obj
		}
	}
	return objects, nil
}

// decodeRendered is decodeStrictly, plus the kinds only the chart has.
func decodeRendered(raw []byte, meta metav1.TypeMeta) (any, error) {
	var v any
	switch meta.APIVersion + " " + meta.Kind {
	case "v1 Secret":
		v = &corev1.Secret{}
	case "monitoring.coreos.com/v1 PrometheusRule":
		v = &monitoringv1.PrometheusRule{}
	case "monitoring.coreos.com/v1 PodMonitor":
		v = &monitoringv1.PodMonitor{}
	case "monitoring.coreos.com/v1 ServiceMonitor":
		v = &monitoringv1.ServiceMonitor{}
	default:
		return decodeStrictly(raw, meta)
	}
	return v, strictYAML(raw, v)
}

// TestHelmChart renders the chart for its default values and each
// documented combination, and checks that what the chart and the
// kustomize manifests both describe is the same: the node agent's
// DaemonSet, service account and RBAC, and the webhook's Deployment,
// Service and webhooks, and the report's ClusterRole. Wrong values fail
// at the schema.
func TestHelmChart(t *testing.T) {
	defaults, err := renderChart(t, nil)
	if err != nil {
		t.Fatalf("rendering the defaults: %v", err)
	}
	node := kustomizeBuild(t, filepath.Join(kubernetesDir, "node"))
	webhook := kustomizeBuild(t, filepath.Join(kubernetesDir, "webhook"))
	same := func(key string, build map[string][]byte, spec func(any) any) {
		t.Helper()
		sameAsKustomize(t, defaults, build, key, spec)
	}
	same("DaemonSet imds-proxy/imds-proxy-node", node, func(o any) any { return o.(*appsv1.DaemonSet).Spec })
	same("ServiceAccount imds-proxy/imds-proxy-node", node, func(o any) any { return o.(*corev1.ServiceAccount).AutomountServiceAccountToken })
	same("ClusterRole imds-proxy-node", node, func(o any) any { return o.(*rbacv1.ClusterRole).Rules })
	same("ClusterRoleBinding imds-proxy-node", node, func(o any) any {
		b := o.(*rbacv1.ClusterRoleBinding)
		return []any{b.RoleRef, b.Subjects}
	})
	same("Deployment imds-proxy/imds-proxy-webhook", webhook, func(o any) any {
		spec := o.(*appsv1.Deployment).Spec.DeepCopy()
		delete(spec.Template.Annotations, "checksum/tls") // the chart's own certificate
		return spec
	})
	same("Service imds-proxy/imds-proxy-webhook", webhook, func(o any) any { return o.(*corev1.Service).Spec })
	same("ClusterRole imds-proxy-report", kustomizeBuild(t, filepath.Join(kubernetesDir, "report")), func(o any) any { return o.(*rbacv1.ClusterRole).Rules })
	same("MutatingWebhookConfiguration imds-proxy", webhook, func(o any) any {
		hooks := slices.Clone(o.(*admissionregistrationv1.MutatingWebhookConfiguration).Webhooks)
		for i := range hooks {
			hooks[i].ClientConfig.CABundle = nil // kustomize leaves it to cert-manager or gen-certs.sh
		}
		return hooks
	})
	secret, ok := defaults["Secret imds-proxy/imds-proxy-webhook-tls"].(*corev1.Secret)
	mwc, _ := defaults["MutatingWebhookConfiguration imds-proxy"].(*admissionregistrationv1.MutatingWebhookConfiguration)
	if !ok || mwc == nil || len(secret.Data["tls.crt"]) == 0 || !bytes.Equal(secret.Data["ca.crt"], mwc.Webhooks[0].ClientConfig.CABundle) ||
		!bytes.Equal(mwc.Webhooks[0].ClientConfig.CABundle, mwc.Webhooks[1].ClientConfig.CABundle) {
		t.Error("the generated certificate's CA is not the caBundle of both webhooks")
	}

	t.Run("node metrics equal node-with-metrics", func(t *testing.T) {
		objects, err := renderChart(t, map[string]any{"node": map[string]any{"metrics": map[string]any{"enabled": true, "serviceMonitor": true}}})
		if err != nil {
			t.Fatal(err)
		}
		build := kustomizeBuild(t, filepath.Join(kubernetesDir, "node-with-metrics"))
		for _, c := range []struct {
			key  string
			spec func(any) any
		}{
			{"DaemonSet imds-proxy/imds-proxy-node", func(o any) any { return o.(*appsv1.DaemonSet).Spec }},
			{"Service imds-proxy/imds-proxy-node-metrics", func(o any) any { return o.(*corev1.Service).Spec }},
			{"ClusterRole imds-proxy-node-kube-rbac-proxy", func(o any) any { return o.(*rbacv1.ClusterRole).Rules }},
			{"ClusterRole imds-proxy-metrics-reader", func(o any) any { return o.(*rbacv1.ClusterRole).Rules }},
			{"ClusterRoleBinding imds-proxy-node-kube-rbac-proxy", func(o any) any {
				b := o.(*rbacv1.ClusterRoleBinding)
				return []any{b.RoleRef, b.Subjects}
			}},
		} {
			sameAsKustomize(t, objects, build, c.key, c.spec)
		}
		m, ok := objects["ServiceMonitor imds-proxy/imds-proxy-node"].(*monitoringv1.ServiceMonitor)
		svc, _ := objects["Service imds-proxy/imds-proxy-node-metrics"].(*corev1.Service)
		if !ok || svc == nil || m.Spec.Selector.MatchLabels["app.kubernetes.io/name"] != svc.Labels["app.kubernetes.io/name"] ||
			len(m.Spec.Endpoints) != 1 || m.Spec.Endpoints[0].Port != svc.Spec.Ports[0].Name {
			t.Error("no ServiceMonitor selecting the node metrics Service and its port")
		}
	})

	t.Run("combinations", func(t *testing.T) {
		for _, c := range []struct {
			name   string
			values string
			check  func(map[string]any) string
		}{
			{"cert-manager", "webhook: {certManager: true}", func(o map[string]any) string {
				if _, ok := o["Certificate imds-proxy/imds-proxy-webhook"]; !ok {
					return "no Certificate"
				}
				if _, ok := o["Secret imds-proxy/imds-proxy-webhook-tls"]; ok {
					return "a generated Secret beside cert-manager's"
				}
				return ""
			}},
			{"node agent only", "webhook: {enabled: false}", func(o map[string]any) string {
				if _, ok := o["Deployment imds-proxy/imds-proxy-webhook"]; ok || o["DaemonSet imds-proxy/imds-proxy-node"] == nil {
					return "want the DaemonSet alone"
				}
				return ""
			}},
			{"webhook only, deny, a floor", "node: {enabled: false}\nwebhook: {onViolation: deny, sidecar: {v1: block, v1Floor: warn}, allowOptOutNamespaces: [legacy]}", func(o map[string]any) string {
				d, ok := o["Deployment imds-proxy/imds-proxy-webhook"].(*appsv1.Deployment)
				if !ok || o["DaemonSet imds-proxy/imds-proxy-node"] != nil {
					return "want the webhook alone"
				}
				args := strings.Join(d.Spec.Template.Spec.Containers[0].Args, " ")
				for _, want := range []string{"--on-violation=deny", "--v1=block", "--v1-floor=warn", "--allow-opt-out-namespaces=legacy"} {
					if !strings.Contains(args, want) {
						return "webhook args lack " + want + ": " + args
					}
				}
				return ""
			}},
			{"a staged shutdown on the nodes", "node: {v1: warn, v1Floor: allow, guardOwnIdentity: true, v1Tokenless: true, interfaces: [eni+]}\nimage: {tag: 0.2.0}", func(o map[string]any) string {
				c := o["DaemonSet imds-proxy/imds-proxy-node"].(*appsv1.DaemonSet).Spec.Template.Spec.Containers[0]
				args := strings.Join(c.Args, " ")
				for _, want := range []string{"--v1=warn", "--v1-floor=allow", "--guard-own-identity", "--v1-tokenless", "--interfaces=eni+ "} {
					if !strings.Contains(args+" ", want) {
						return "node args lack " + want + ": " + args
					}
				}
				if c.Image != "ghcr.io/imds-proxy/imds-proxy:0.2.0" {
					return "image " + c.Image
				}
				return ""
			}},
			{"PodMonitor", "podMonitor: {enabled: true}", func(o map[string]any) string {
				m, ok := o["PodMonitor imds-proxy/imds-proxy-webhook"].(*monitoringv1.PodMonitor)
				d, _ := o["Deployment imds-proxy/imds-proxy-webhook"].(*appsv1.Deployment)
				if !ok || d == nil || len(m.Spec.PodMetricsEndpoints) != 1 || m.Spec.PodMetricsEndpoints[0].Port == nil ||
					*m.Spec.PodMetricsEndpoints[0].Port != d.Spec.Template.Spec.Containers[0].Ports[1].Name ||
					m.Spec.Selector.MatchLabels["app.kubernetes.io/name"] != d.Spec.Template.Labels["app.kubernetes.io/name"] {
					return "no PodMonitor selecting the webhook's pods and their metrics port"
				}
				s, ok := o["PodMonitor imds-proxy/imds-proxy-sidecars"].(*monitoringv1.PodMonitor)
				if !ok || !s.Spec.NamespaceSelector.Any || len(s.Spec.Selector.MatchLabels)+len(s.Spec.Selector.MatchExpressions) != 0 ||
					len(s.Spec.PodMetricsEndpoints) != 1 || s.Spec.PodMetricsEndpoints[0].Port == nil || *s.Spec.PodMetricsEndpoints[0].Port != inject.MetricsPortName {
					return "no PodMonitor of every namespace's pods on the injected sidecar's metrics port " + inject.MetricsPortName
				}
				return ""
			}},
			{"PodMonitor without the sidecars", "podMonitor: {enabled: true, sidecars: false}", func(o map[string]any) string {
				if _, ok := o["PodMonitor imds-proxy/imds-proxy-sidecars"]; ok || o["PodMonitor imds-proxy/imds-proxy-webhook"] == nil {
					return "want the webhook's PodMonitor alone"
				}
				return ""
			}},
			{"PrometheusRule", "prometheusRule: {enabled: true}", func(o map[string]any) string {
				r, ok := o["PrometheusRule imds-proxy/imds-proxy"].(*monitoringv1.PrometheusRule)
				if !ok || len(r.Spec.Groups) == 0 || len(r.Spec.Groups[0].Rules) < 7 {
					return "no PrometheusRule with the alerts"
				}
				return ""
			}},
		} {
			t.Run(c.name, func(t *testing.T) {
				var values map[string]any
				if err := yaml.Unmarshal([]byte(c.values), &values); err != nil {
					t.Fatal(err)
				}
				objects, err := renderChart(t, values)
				if err != nil {
					t.Fatalf("rendering %s: %v", c.values, err)
				}
				if msg := c.check(objects); msg != "" {
					t.Error(msg)
				}
			})
		}
	})

	t.Run("wrong values fail at the schema", func(t *testing.T) {
		for _, values := range []string{
			"node: {v1: sometimes}",
			"node: {interfaces: [eth0]}",
			"node: {interfaces: ['+']}",
			"webhook: {onViolation: ignore}",
			"webhook: {replicas: 0}",
			"nodes: {enabled: false}",
		} {
			var v map[string]any
			if err := yaml.Unmarshal([]byte(values), &v); err != nil {
				t.Fatal(err)
			}
			if _, err := renderChart(t, v); err == nil {
				t.Errorf("%s: rendered, want a schema error", values)
			}
		}
	})

	t.Run("the chart's rules are deploy/prometheus's", func(t *testing.T) {
		chartRules, err1 := os.ReadFile(filepath.Join(chartDir, "files", "rules.yaml"))
		rules, err2 := os.ReadFile(filepath.Join(prometheusDir, "rules.yaml"))
		if err1 != nil || err2 != nil || !bytes.Equal(chartRules, rules) {
			t.Errorf("%s is not a copy of %s/rules.yaml (%v, %v): cp it", filepath.Join(chartDir, "files", "rules.yaml"), prometheusDir, err1, err2)
		}
	})
}

// sameAsKustomize checks that the part spec picks of the chart's object key
// equals that of the kustomize build's.
func sameAsKustomize(t *testing.T, chart map[string]any, build map[string][]byte, key string, spec func(any) any) {
	t.Helper()
	got, ok := chart[key]
	if !ok {
		t.Errorf("the chart has no %s", key)
		return
	}
	want, err := decodeStrictly(build[key], metav1.TypeMeta{APIVersion: apiVersionOf(got), Kind: strings.Fields(key)[0]})
	if err != nil {
		t.Fatalf("%s: %v", key, err)
	}
	if g, w := spec(got), spec(want); !reflect.DeepEqual(g, w) {
		gy, _ := yaml.Marshal(g)
		wy, _ := yaml.Marshal(w)
		t.Errorf("%s differs between the chart and kustomize:\n--- chart\n%s\n--- kustomize\n%s", key, gy, wy)
	}
}

// apiVersionOf is the apiVersion of a decoded object.
func apiVersionOf(obj any) string {
	return reflect.ValueOf(obj).Elem().FieldByName("TypeMeta").Interface().(metav1.TypeMeta).APIVersion
}
