package testutil

import (
	"context"
	"encoding/json"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// kubeResources are the resources the tests create, by kind.
var kubeResources = map[string]schema.GroupVersionResource{
	"Namespace":          {Version: "v1", Resource: "namespaces"},
	"Node":               {Version: "v1", Resource: "nodes"},
	"ServiceAccount":     {Version: "v1", Resource: "serviceaccounts"},
	"Pod":                {Version: "v1", Resource: "pods"},
	"Secret":             {Version: "v1", Resource: "secrets"},
	"ConfigMap":          {Version: "v1", Resource: "configmaps"},
	"Deployment":         {Group: "apps", Version: "v1", Resource: "deployments"},
	"ReplicaSet":         {Group: "apps", Version: "v1", Resource: "replicasets"},
	"StatefulSet":        {Group: "apps", Version: "v1", Resource: "statefulsets"},
	"DaemonSet":          {Group: "apps", Version: "v1", Resource: "daemonsets"},
	"Job":                {Group: "batch", Version: "v1", Resource: "jobs"},
	"CronJob":            {Group: "batch", Version: "v1", Resource: "cronjobs"},
	"ClusterRole":        {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"},
	"ClusterRoleBinding": {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterrolebindings"},
}

// KubeClient is an administrator's client of a real API server, for
// putting objects there as a test needs them.
type KubeClient struct {
	t     testing.TB
	Admin *dynamic.DynamicClient
}

// Client is an administrator's client of s.
func (s *KubeAPIServer) Client(t testing.TB) *KubeClient {
	t.Helper()
	admin, err := dynamic.NewForConfig(s.Config())
	if err != nil {
		t.Fatal(err)
	}
	return &KubeClient{t: t, Admin: admin}
}

// Resource is the client of kind's resource in namespace ("" for a
// cluster-wide kind).
func (c *KubeClient) Resource(kind, namespace string) dynamic.ResourceInterface {
	gvr, ok := kubeResources[kind]
	if !ok {
		c.t.Fatalf("no resource for kind %s", kind)
	}
	if namespace == "" {
		return c.Admin.Resource(gvr)
	}
	return c.Admin.Resource(gvr).Namespace(namespace)
}

// KubeCreate stores obj (a typed object with its TypeMeta set) and returns
// it as stored, decoded into a new value of its type.
func KubeCreate[T any](c *KubeClient, obj *T) *T {
	c.t.Helper()
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		c.t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	got, err := c.Resource(u.GetKind(), u.GetNamespace()).Create(context.Background(), u, metav1.CreateOptions{})
	if err != nil {
		c.t.Fatalf("creating %s %s/%s: %v", u.GetKind(), u.GetNamespace(), u.GetName(), err)
	}
	out := new(T)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(got.Object, out); err != nil {
		c.t.Fatal(err)
	}
	return out
}

// Patch applies a JSON merge patch to an object or, with subresource
// "status", to its status.
func (c *KubeClient) Patch(kind, namespace, name string, patch any, subresource ...string) {
	c.t.Helper()
	data, err := json.Marshal(patch)
	if err != nil {
		c.t.Fatal(err)
	}
	if _, err := c.Resource(kind, namespace).Patch(context.Background(), name, types.MergePatchType, data, metav1.PatchOptions{}, subresource...); err != nil {
		c.t.Fatalf("patching %s %s/%s %s: %v", kind, namespace, name, data, err)
	}
}

// ApplyManifests creates what kustomize builds of dir and returns their
// kinds.
func (c *KubeClient) ApplyManifests(dir string) (kinds []string) {
	c.t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		c.t.Fatalf("kustomize build %s: %v", dir, err)
	}
	for _, r := range m.Resources() {
		obj, err := r.Map()
		if err != nil {
			c.t.Fatal(err)
		}
		u := &unstructured.Unstructured{Object: obj}
		if _, err := c.Resource(u.GetKind(), u.GetNamespace()).Create(context.Background(), u, metav1.CreateOptions{}); err != nil {
			c.t.Fatalf("applying %s %s from %s: %v", u.GetKind(), u.GetName(), dir, err)
		}
		kinds = append(kinds, u.GetKind())
	}
	return kinds
}

// ApplyNodeManifests creates what kustomize builds of dir, the node
// agent's deploy/kubernetes/node: the namespace, the agent's service
// account, its ClusterRole and binding (and the DaemonSet, which nothing
// runs here).
func (c *KubeClient) ApplyNodeManifests(dir string) {
	c.t.Helper()
	kinds := c.ApplyManifests(dir)
	for _, want := range []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding"} {
		if !slices.Contains(kinds, want) {
			c.t.Fatalf("%s has no %s (it has %v)", dir, want, kinds)
		}
	}
}

// SetContainerStatuses patches the pod's status as a kubelet would once
// its containers run: each container's runtime ID ("containerd://<id>").
func (c *KubeClient) SetContainerStatuses(p *corev1.Pod, runtimeIDs map[string]string, initRuntimeIDs map[string]string) {
	c.t.Helper()
	status := func(names map[string]string, specs []corev1.Container) []corev1.ContainerStatus {
		var out []corev1.ContainerStatus
		for _, spec := range specs {
			id, ok := names[spec.Name]
			if !ok {
				continue
			}
			out = append(out, corev1.ContainerStatus{
				Name: spec.Name, Image: spec.Image, ContainerID: id,
				State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.Now()}},
			})
		}
		return out
	}
	c.Patch("Pod", p.Namespace, p.Name, map[string]any{"status": corev1.PodStatus{
		Phase:                 corev1.PodRunning,
		ContainerStatuses:     status(runtimeIDs, p.Spec.Containers),
		InitContainerStatuses: status(initRuntimeIDs, p.Spec.InitContainers),
	}}, "status")
}

// SetPodIPs patches the pod's addresses (and phase, if not ""), as a
// kubelet reports them; the node's address is 192.168.1.10.
func (c *KubeClient) SetPodIPs(p *corev1.Pod, phase corev1.PodPhase, ips ...string) {
	c.t.Helper()
	status := map[string]any{
		"hostIP": "192.168.1.10", "hostIPs": []map[string]string{{"ip": "192.168.1.10"}},
		"podIP": ips[0], "podIPs": []map[string]string{},
	}
	for _, ip := range ips {
		status["podIPs"] = append(status["podIPs"].([]map[string]string), map[string]string{"ip": ip})
	}
	if phase != "" {
		status["phase"] = phase
	}
	c.Patch("Pod", p.Namespace, p.Name, map[string]any{"status": status}, "status")
}

// KubeResource is kind's resource, for a client of the test's own.
func KubeResource(kind string) schema.GroupVersionResource { return kubeResources[kind] }
