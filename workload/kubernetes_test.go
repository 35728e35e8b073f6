//go:build kubernetes

package workload

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

const (
	testNode  = "node-a"
	otherNode = "node-b"
	// The node agent's service account, as deploy/kubernetes/node names it.
	agentNamespace = "imds-proxy"
	agentSA        = "imds-proxy-node"
)

func typeMeta(kind, apiVersion string) metav1.TypeMeta {
	return metav1.TypeMeta{Kind: kind, APIVersion: apiVersion}
}

func controllerRef(kind, apiVersion, name string, uid types.UID) []metav1.OwnerReference {
	yes := true
	return []metav1.OwnerReference{{APIVersion: apiVersion, Kind: kind, Name: name, UID: uid, Controller: &yes}}
}

func newPod(namespace, name, node, sa string, owners []metav1.OwnerReference, annotations map[string]string, containers ...corev1.Container) *corev1.Pod {
	return &corev1.Pod{
		TypeMeta: typeMeta("Pod", "v1"),
		ObjectMeta: metav1.ObjectMeta{
			Namespace: namespace, Name: name, OwnerReferences: owners, Annotations: annotations,
			Labels: map[string]string{"app": name},
		},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa, Containers: containers},
	}
}

func podTemplate(name string) corev1.PodTemplateSpec {
	return corev1.PodTemplateSpec{
		ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyOnFailure,
			Containers:    []corev1.Container{{Name: "app", Image: "public.ecr.aws/docker/library/busybox:1.37"}},
		},
	}
}

// kubeContainerID is a runtime container ID, 64 hexadecimal digits.
func kubeContainerID(n int) string { return fmt.Sprintf("%064x", n) }

// startSource runs a Kubernetes source for testNode with cfg's
// credentials until the test ends, and waits until it has listed.
func startSource(t *testing.T, cfg *rest.Config, log *zap.Logger, wait bool) *Kubernetes {
	t.Helper()
	k, err := NewKubernetes(KubernetesConfig{REST: cfg, NodeName: testNode, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	run(t, k)
	if wait {
		eventuallyDetail(t, 20*time.Second, "the source lists pods and namespaces", func() (bool, string) { return k.Synced(), "" })
	}
	return k
}

// eventuallyDetail polls cond until it holds or timeout passes, and says
// what it last saw.
func eventuallyDetail(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, detail := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s: %s", timeout, what, detail)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// lookupEventually waits until Lookup(c) is want.
func lookupEventually(t *testing.T, k *Kubernetes, c attribution.Container, want Workload) {
	t.Helper()
	eventuallyDetail(t, 10*time.Second, fmt.Sprintf("Lookup(%+v)", c), func() (bool, string) {
		got, ok := k.Lookup(c)
		if !ok {
			return false, "not found"
		}
		diff := cmp.Diff(want, got)
		return diff == "", "(-want +got)\n" + diff
	})
}

func TestKubernetesSource(t *testing.T) {
	server := testutil.StartKubeAPIServer(t)
	c := server.Client(t)
	c.ApplyNodeManifests(filepath.Join("..", "deploy", "kubernetes", "node"))

	// Namespace team-a sets defaults; its pods override some.
	testutil.KubeCreate(c, &corev1.Namespace{TypeMeta: typeMeta("Namespace", "v1"), ObjectMeta: metav1.ObjectMeta{
		Name:        "team-a",
		Annotations: map[string]string{V1Key: "warn", "imds-proxy.io/note": "namespace", "other.example/x": "not a setting"},
	}})
	for _, sa := range []*corev1.ServiceAccount{
		{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web"}},
		{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "batch"}},
		{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "debug", Annotations: map[string]string{
			IRSARoleAnnotation: "arn:aws:iam::111122223333:role/debug"}}},
	} {
		sa.TypeMeta = typeMeta("ServiceAccount", "v1")
		testutil.KubeCreate(c, sa)
	}

	// Deployment web -> ReplicaSet web-5d9f8c7b6 -> pod, stored directly
	// (no controller manager runs): the app container has what the EKS pod
	// identity webhook injects for IRSA.
	deploy := testutil.KubeCreate(c, &appsv1.Deployment{TypeMeta: typeMeta("Deployment", "apps/v1"),
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web"},
		Spec: appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Template: withRestartAlways(podTemplate("web"))}})
	rs := testutil.KubeCreate(c, &appsv1.ReplicaSet{TypeMeta: typeMeta("ReplicaSet", "apps/v1"),
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web-5d9f8c7b6",
			OwnerReferences: controllerRef("Deployment", "apps/v1", "web", deploy.UID)},
		Spec: appsv1.ReplicaSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Template: withRestartAlways(podTemplate("web"))}})
	webSpec := newPod("team-a", "web-5d9f8c7b6-x2m4q", testNode, "web",
		controllerRef("ReplicaSet", "apps/v1", rs.Name, rs.UID),
		map[string]string{"imds-proxy.io/note": "pod"},
		corev1.Container{Name: "app", Image: "registry.example/web:1.4", Env: []corev1.EnvVar{
			{Name: "AWS_ROLE_ARN", Value: "arn:aws:iam::111122223333:role/web"},
			{Name: "AWS_WEB_IDENTITY_TOKEN_FILE", Value: "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"},
		}},
		corev1.Container{Name: "log-shipper", Image: "registry.example/shipper:2"},
	)
	webSpec.Spec.InitContainers = []corev1.Container{{Name: "migrate", Image: "registry.example/web-migrate:1.4"}}
	web := testutil.KubeCreate(c, webSpec)
	c.SetContainerStatuses(web, map[string]string{
		"app":         "containerd://" + kubeContainerID(1),
		"log-shipper": "containerd://" + kubeContainerID(2),
	}, map[string]string{"migrate": "cri-o://" + kubeContainerID(3)})

	// CronJob nightly -> Job nightly-29123456 -> pod, with EKS Pod Identity
	// (over IPv6).
	cron := testutil.KubeCreate(c, &batchv1.CronJob{TypeMeta: typeMeta("CronJob", "batch/v1"),
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "nightly"},
		Spec: batchv1.CronJobSpec{Schedule: "0 3 * * *", JobTemplate: batchv1.JobTemplateSpec{
			Spec: batchv1.JobSpec{Template: podTemplate("nightly")}}}})
	job := testutil.KubeCreate(c, &batchv1.Job{TypeMeta: typeMeta("Job", "batch/v1"),
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "nightly-29123456",
			OwnerReferences: controllerRef("CronJob", "batch/v1", "nightly", cron.UID)},
		Spec: batchv1.JobSpec{Template: podTemplate("nightly")}})
	nightly := testutil.KubeCreate(c, newPod("team-a", "nightly-29123456-7tq9z", testNode, "batch",
		controllerRef("Job", "batch/v1", job.Name, job.UID), nil,
		corev1.Container{Name: "task", Image: "registry.example/report:7", Env: []corev1.EnvVar{
			{Name: "AWS_CONTAINER_CREDENTIALS_FULL_URI", Value: "http://[fd00:ec2::23]/v1/credentials"},
			{Name: "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", Value: "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token"},
		}}))
	c.SetContainerStatuses(nightly, map[string]string{"task": "containerd://" + kubeContainerID(4)}, nil)

	// A StatefulSet's pod (its owner is its workload: no lookup), a bare
	// pod whose service account has an IRSA role, and a pod of another
	// node, which the source must not see.
	sts := testutil.KubeCreate(c, &appsv1.StatefulSet{TypeMeta: typeMeta("StatefulSet", "apps/v1"),
		ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "db"},
		Spec: appsv1.StatefulSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
			Template: withRestartAlways(podTemplate("db"))}})
	db := testutil.KubeCreate(c, newPod("team-a", "db-0", testNode, "web", controllerRef("StatefulSet", "apps/v1", "db", sts.UID), nil,
		corev1.Container{Name: "postgres", Image: "registry.example/postgres:17", Env: []corev1.EnvVar{
			// Not Pod Identity: another host.
			{Name: "AWS_CONTAINER_CREDENTIALS_FULL_URI", Value: "http://127.0.0.1:9911/creds"},
		}}))
	c.SetContainerStatuses(db, map[string]string{"postgres": "docker://" + kubeContainerID(5)}, nil)
	debug := testutil.KubeCreate(c, newPod("team-a", "debug", testNode, "debug", nil, map[string]string{V1Key: "allow"},
		corev1.Container{Name: "shell", Image: "registry.example/toolbox:1"}))
	elsewhere := testutil.KubeCreate(c, newPod("team-a", "elsewhere", otherNode, "web", nil, nil,
		corev1.Container{Name: "app", Image: "registry.example/web:1.4"}))
	c.SetContainerStatuses(elsewhere, map[string]string{"app": "containerd://" + kubeContainerID(9)}, nil)

	// The source runs as the node agent's service account, with exactly
	// the RBAC of deploy/kubernetes/node.
	agentCfg := server.ServiceAccountConfig(agentNamespace, agentSA)
	logs, observed := observer.New(zapcore.DebugLevel)
	k := startSource(t, agentCfg, zap.New(logs), true)

	webWorkload := Workload{
		Platform: "kubernetes", Namespace: "team-a", Name: "Deployment/web", Pod: web.Name,
		ServiceAccount: "web", OwnIdentity: IdentityIRSA,
		Settings: map[string]string{V1Key: "warn", "imds-proxy.io/note": "pod"},
	}
	t.Run("DeploymentPodContainers", func(t *testing.T) {
		want := webWorkload
		want.Container, want.Image = "app", "registry.example/web:1.4"
		lookupEventually(t, k, attribution.Container{Runtime: "containerd", ID: kubeContainerID(1), PodUID: string(web.UID)}, want)
		// The cgroup named no pod: the container ID alone finds it.
		lookupEventually(t, k, attribution.Container{Runtime: "containerd", ID: kubeContainerID(1)}, want)

		want.Container, want.Image, want.OwnIdentity = "log-shipper", "registry.example/shipper:2", ""
		lookupEventually(t, k, attribution.Container{ID: kubeContainerID(2), PodUID: string(web.UID)}, want)
		want.Container, want.Image = "migrate", "registry.example/web-migrate:1.4"
		lookupEventually(t, k, attribution.Container{Runtime: "cri-o", ID: kubeContainerID(3), PodUID: string(web.UID)}, want)

		// A container the status does not list (yet): the pod's workload,
		// no container; not every app container has IRSA.
		want.Container, want.Image = "", ""
		lookupEventually(t, k, attribution.Container{ID: kubeContainerID(99), PodUID: string(web.UID)}, want)
	})
	t.Run("CronJobPodIdentity", func(t *testing.T) {
		lookupEventually(t, k, attribution.Container{ID: kubeContainerID(4), PodUID: string(nightly.UID)}, Workload{
			Platform: "kubernetes", Namespace: "team-a", Name: "CronJob/nightly", Pod: nightly.Name,
			Container: "task", ServiceAccount: "batch", Image: "registry.example/report:7", OwnIdentity: IdentityPodIdentity,
			Settings: map[string]string{V1Key: "warn", "imds-proxy.io/note": "namespace"},
		})
	})
	t.Run("StatefulSet", func(t *testing.T) {
		lookupEventually(t, k, attribution.Container{Runtime: "docker", ID: kubeContainerID(5), PodUID: string(db.UID)}, Workload{
			Platform: "kubernetes", Namespace: "team-a", Name: "StatefulSet/db", Pod: "db-0",
			Container: "postgres", ServiceAccount: "web", Image: "registry.example/postgres:17",
			Settings: map[string]string{V1Key: "warn", "imds-proxy.io/note": "namespace"},
		})
	})
	t.Run("BarePodServiceAccountRole", func(t *testing.T) {
		// No container status yet; the service account's role annotation
		// is read in the background.
		lookupEventually(t, k, attribution.Container{ID: kubeContainerID(6), PodUID: string(debug.UID)}, Workload{
			Platform: "kubernetes", Namespace: "team-a", Name: "Pod/debug", Pod: "debug",
			ServiceAccount: "debug", OwnIdentity: IdentityIRSA,
			Settings: map[string]string{V1Key: "allow", "imds-proxy.io/note": "namespace"},
		})
	})
	t.Run("OtherNodeAndUnknown", func(t *testing.T) {
		for _, c := range []attribution.Container{
			{ID: kubeContainerID(9), PodUID: string(elsewhere.UID)},
			{ID: kubeContainerID(9)},
			{ID: kubeContainerID(42), PodUID: "6f1c2b0e-1111-2222-3333-444455556666"},
			{},
		} {
			if w, ok := k.Lookup(c); ok {
				t.Errorf("Lookup(%+v) = %v, want nothing (not a pod of %s)", c, w, testNode)
			}
		}
	})
	t.Run("PodAddresses", func(t *testing.T) {
		// A finished pod (its address may be another's by now), a pod of
		// another node and a hostNetwork pod (its address is the node's)
		// are at no address; then the web pod gets its addresses, which
		// the source sees after the others' (one watch, in order).
		c.SetPodIPs(nightly, corev1.PodSucceeded, "10.1.0.6")
		c.SetPodIPs(elsewhere, "", "10.1.0.9")
		hostPod := newPod("team-a", "node-exporter", testNode, "web", nil, nil,
			corev1.Container{Name: "exporter", Image: "registry.example/node-exporter:1"})
		hostPod.Spec.HostNetwork = true
		hostPod = testutil.KubeCreate(c, hostPod)
		c.SetPodIPs(hostPod, "", "192.168.1.10")
		c.SetPodIPs(web, "", "10.1.0.5", "fd00:10:1::5")

		want := webWorkload
		want.OwnIdentity = "" // not every container of the pod has IRSA
		for _, addr := range []string{"10.1.0.5", "fd00:10:1::5", "::ffff:10.1.0.5"} {
			a := netip.MustParseAddr(addr)
			eventuallyDetail(t, 10*time.Second, "LookupAddr("+addr+")", func() (bool, string) {
				got, ok := k.LookupAddr(a)
				diff := cmp.Diff(want, got)
				return ok && diff == "", fmt.Sprintf("found %v (-want +got)\n%s", ok, diff)
			})
		}
		if _, ok := k.Lookup(attribution.Container{PodUID: string(hostPod.UID)}); !ok {
			t.Error("the hostNetwork pod is not known")
		}
		for _, addr := range []string{"10.1.0.6", "10.1.0.9", "192.168.1.10", "10.1.0.77"} {
			if w, ok := k.LookupAddr(netip.MustParseAddr(addr)); ok {
				t.Errorf("LookupAddr(%s) = %v, want nothing", addr, w)
			}
		}
		// Two pods claiming one address: neither is named by it.
		c.SetPodIPs(db, "", "10.1.0.5")
		eventuallyDetail(t, 10*time.Second, "10.1.0.5 ambiguous", func() (bool, string) {
			w, ok := k.LookupAddr(netip.MustParseAddr("10.1.0.5"))
			return !ok, w.String()
		})
		c.SetPodIPs(db, "", "10.1.0.7")
		eventuallyDetail(t, 10*time.Second, "10.1.0.5 the web pod's again, 10.1.0.7 the db pod's", func() (bool, string) {
			w1, _ := k.LookupAddr(netip.MustParseAddr("10.1.0.5"))
			w2, _ := k.LookupAddr(netip.MustParseAddr("10.1.0.7"))
			return w1.Pod == web.Name && w2.Pod == "db-0", w1.Pod + " " + w2.Pod
		})
	})
	t.Run("PolicyChangesShowWithinSeconds", func(t *testing.T) {
		c.Patch("Pod", "team-a", web.Name, map[string]any{"metadata": map[string]any{"annotations": map[string]any{V1Key: "block"}}})
		start := time.Now()
		eventuallyDetail(t, 5*time.Second, "the pod's new imds-proxy.io/v1", func() (bool, string) {
			w, _ := k.Lookup(attribution.Container{ID: kubeContainerID(1), PodUID: string(web.UID)})
			p, set, err := w.V1Policy()
			return set && err == nil && p == imdsapi.V1Block, fmt.Sprintf("%v %v %v (%v)", p, set, err, w.Settings)
		})
		t.Logf("a pod annotation reached Lookup in %v", time.Since(start).Round(time.Millisecond))
		// A namespace default reaches the pods that set none.
		c.Patch("Namespace", "", "team-a", map[string]any{"metadata": map[string]any{"annotations": map[string]any{V1Key: "block"}}})
		start = time.Now()
		eventuallyDetail(t, 5*time.Second, "the namespace's new imds-proxy.io/v1", func() (bool, string) {
			w, _ := k.Lookup(attribution.Container{PodUID: string(nightly.UID)})
			return w.Settings[V1Key] == "block", fmt.Sprint(w.Settings)
		})
		t.Logf("a namespace annotation reached Lookup in %v", time.Since(start).Round(time.Millisecond))
		// Removing the pod's own setting falls back to the namespace's.
		c.Patch("Pod", "team-a", "debug", map[string]any{"metadata": map[string]any{"annotations": map[string]any{V1Key: nil}}})
		eventuallyDetail(t, 5*time.Second, "the debug pod's setting removed", func() (bool, string) {
			w, _ := k.Lookup(attribution.Container{PodUID: string(debug.UID)})
			return w.Settings[V1Key] == "block", fmt.Sprint(w.Settings)
		})
	})
	t.Run("NewPodOwnerFilledIn", func(t *testing.T) {
		rs2 := testutil.KubeCreate(c, &appsv1.ReplicaSet{TypeMeta: typeMeta("ReplicaSet", "apps/v1"),
			ObjectMeta: metav1.ObjectMeta{Namespace: "team-a", Name: "web-77c4d9f5b8",
				OwnerReferences: controllerRef("Deployment", "apps/v1", "web", deploy.UID)},
			Spec: appsv1.ReplicaSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				Template: withRestartAlways(podTemplate("web"))}})
		p := testutil.KubeCreate(c, newPod("team-a", "web-77c4d9f5b8-h7k2p", testNode, "web",
			controllerRef("ReplicaSet", "apps/v1", rs2.Name, rs2.UID), nil,
			corev1.Container{Name: "app", Image: "registry.example/web:1.5"}))
		var sawDirect bool
		eventuallyDetail(t, 10*time.Second, "the new pod's Deployment", func() (bool, string) {
			w, ok := k.Lookup(attribution.Container{PodUID: string(p.UID)})
			if w.Name == "ReplicaSet/"+rs2.Name {
				sawDirect = true // before the background read: the direct owner
			}
			return ok && w.Name == "Deployment/web", w.Name
		})
		t.Logf("the ReplicaSet's name was served before its Deployment's: %v", sawDirect)
		// A pod deleted leaves the cache.
		if err := c.Resource("Pod", "team-a").Delete(context.Background(), p.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
			t.Fatal(err)
		}
		eventuallyDetail(t, 10*time.Second, "the deleted pod gone", func() (bool, string) {
			_, ok := k.Lookup(attribution.Container{PodUID: string(p.UID)})
			return !ok, ""
		})
	})
	t.Run("RBACIsNoBroaderThanNeeded", func(t *testing.T) {
		agent, err := dynamic.NewForConfig(agentCfg)
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		allowed := map[string]func() error{
			"list pods": func() error {
				_, err := agent.Resource(testutil.KubeResource("Pod")).List(ctx, metav1.ListOptions{})
				return err
			},
			"get a replicaset": func() error {
				_, err := agent.Resource(testutil.KubeResource("ReplicaSet")).Namespace("team-a").Get(ctx, rs.Name, metav1.GetOptions{})
				return err
			},
			"get a job": func() error {
				_, err := agent.Resource(testutil.KubeResource("Job")).Namespace("team-a").Get(ctx, job.Name, metav1.GetOptions{})
				return err
			},
			"get a service account": func() error {
				_, err := agent.Resource(testutil.KubeResource("ServiceAccount")).Namespace("team-a").Get(ctx, "debug", metav1.GetOptions{})
				return err
			},
			"list namespaces": func() error {
				_, err := agent.Resource(testutil.KubeResource("Namespace")).List(ctx, metav1.ListOptions{})
				return err
			},
			"watch pods of this node": func() error {
				return watchOnce(ctx, agent.Resource(testutil.KubeResource("Pod")), "spec.nodeName="+testNode)
			},
		}
		for what, do := range allowed {
			if err := do(); err != nil {
				t.Errorf("%s as the agent: %v", what, err)
			}
		}
		forbidden := map[string]func() error{
			"list secrets": func() error {
				_, err := agent.Resource(testutil.KubeResource("Secret")).List(ctx, metav1.ListOptions{})
				return err
			},
			"get a secret": func() error {
				_, err := agent.Resource(testutil.KubeResource("Secret")).Namespace("team-a").Get(ctx, "x", metav1.GetOptions{})
				return err
			},
			"list configmaps": func() error {
				_, err := agent.Resource(testutil.KubeResource("ConfigMap")).List(ctx, metav1.ListOptions{})
				return err
			},
			"list replicasets": func() error {
				_, err := agent.Resource(testutil.KubeResource("ReplicaSet")).List(ctx, metav1.ListOptions{})
				return err
			},
			"list jobs": func() error {
				_, err := agent.Resource(testutil.KubeResource("Job")).List(ctx, metav1.ListOptions{})
				return err
			},
			"list service accounts": func() error {
				_, err := agent.Resource(testutil.KubeResource("ServiceAccount")).List(ctx, metav1.ListOptions{})
				return err
			},
			"get a deployment": func() error {
				_, err := agent.Resource(testutil.KubeResource("Deployment")).Namespace("team-a").Get(ctx, "web", metav1.GetOptions{})
				return err
			},
			"get a namespace": func() error {
				_, err := agent.Resource(testutil.KubeResource("Namespace")).Get(ctx, "team-a", metav1.GetOptions{})
				return err
			},
			"delete a pod": func() error {
				return agent.Resource(testutil.KubeResource("Pod")).Namespace("team-a").Delete(ctx, "debug", metav1.DeleteOptions{})
			},
			"patch a pod": func() error {
				_, err := agent.Resource(testutil.KubeResource("Pod")).Namespace("team-a").Patch(ctx, "debug", types.MergePatchType, []byte(`{}`), metav1.PatchOptions{})
				return err
			},
			"create a service account token": func() error {
				_, err := agent.Resource(testutil.KubeResource("ServiceAccount")).Namespace("team-a").Create(ctx, &unstructured.Unstructured{Object: map[string]any{
					"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
					"metadata": map[string]any{"name": "debug"}, "spec": map[string]any{}}}, metav1.CreateOptions{}, "token")
				return err
			},
		}
		for what, do := range forbidden {
			if err := do(); !apierrors.IsForbidden(err) {
				t.Errorf("%s as the agent: %v, want forbidden", what, err)
			}
		}
		// And with that RBAC the source logged no trouble.
		for _, e := range observed.FilterLevelExact(zapcore.WarnLevel).All() {
			t.Errorf("the source warned: %s %v", e.Message, e.ContextMap())
		}
	})
	t.Run("DegradesWithoutOwnerRBAC", func(t *testing.T) {
		// A service account that may read pods and namespaces only: the
		// pods are served with their direct owners, and the forbidden
		// reads are logged once, not per retry.
		testutil.KubeCreate(c, &corev1.ServiceAccount{TypeMeta: typeMeta("ServiceAccount", "v1"),
			ObjectMeta: metav1.ObjectMeta{Namespace: agentNamespace, Name: "pods-only"}})
		testutil.KubeCreate(c, &rbacv1.ClusterRole{TypeMeta: typeMeta("ClusterRole", "rbac.authorization.k8s.io/v1"),
			ObjectMeta: metav1.ObjectMeta{Name: "pods-only"},
			Rules: []rbacv1.PolicyRule{
				{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"list", "watch"}},
				{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"list", "watch"}},
			}})
		testutil.KubeCreate(c, &rbacv1.ClusterRoleBinding{TypeMeta: typeMeta("ClusterRoleBinding", "rbac.authorization.k8s.io/v1"),
			ObjectMeta: metav1.ObjectMeta{Name: "pods-only"},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "pods-only"},
			Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: agentNamespace, Name: "pods-only"}}})
		logs, observed := observer.New(zapcore.InfoLevel)
		k := startSource(t, server.ServiceAccountConfig(agentNamespace, "pods-only"), zap.New(logs), true)
		want := webWorkload
		want.Name = "ReplicaSet/web-5d9f8c7b6"
		want.Settings = map[string]string{V1Key: "block", "imds-proxy.io/note": "pod"}
		want.Container, want.Image = "app", "registry.example/web:1.4"
		lookupEventually(t, k, attribution.Container{ID: kubeContainerID(1), PodUID: string(web.UID)}, want)
		eventuallyDetail(t, 10*time.Second, "a warning about replicasets", func() (bool, string) {
			return observed.FilterField(zap.String("what", "get replicasets")).Len() > 0, ""
		})
		time.Sleep(2500 * time.Millisecond) // a retry or two (1 s, 2 s)
		for _, what := range []string{"get replicasets", "get jobs", "get serviceaccounts"} {
			entries := observed.FilterField(zap.String("what", what)).All()
			if len(entries) != 1 || entries[0].Level != zapcore.WarnLevel || entries[0].ContextMap()["forbidden"] != true {
				t.Errorf("%s: logged %d times, want one warning saying forbidden: %v", what, len(entries), entries)
			}
		}
	})
	t.Run("NoRBACAtAll", func(t *testing.T) {
		logs, observed := observer.New(zapcore.InfoLevel)
		k := startSource(t, server.ServiceAccountConfig(agentNamespace, "nobody"), zap.New(logs), false)
		eventuallyDetail(t, 10*time.Second, "a warning about pods", func() (bool, string) {
			return observed.FilterField(zap.String("what", "pods")).Len() > 0 && observed.FilterField(zap.String("what", "namespaces")).Len() > 0, ""
		})
		start := time.Now()
		if w, ok := k.Lookup(attribution.Container{ID: kubeContainerID(1), PodUID: string(web.UID)}); ok {
			t.Errorf("Lookup without any RBAC: %v", w)
		}
		if d := time.Since(start); d > 50*time.Millisecond {
			t.Errorf("Lookup took %v", d)
		}
		time.Sleep(2 * time.Second)
		if n := observed.FilterField(zap.String("what", "pods")).Len(); n != 1 {
			t.Errorf("the failing pod watch was logged %d times, want once: %v", n, observed.All())
		}
	})
	// Last: the API server goes away; what the source knows stays served.
	t.Run("APIServerDown", func(t *testing.T) {
		want := webWorkload
		want.Settings = map[string]string{V1Key: "block", "imds-proxy.io/note": "pod"}
		want.Container, want.Image = "app", "registry.example/web:1.4"
		lookupEventually(t, k, attribution.Container{ID: kubeContainerID(1), PodUID: string(web.UID)}, want)
		server.Stop()
		time.Sleep(2 * time.Second)
		start := time.Now()
		got, ok := k.Lookup(attribution.Container{ID: kubeContainerID(1), PodUID: string(web.UID)})
		if d := time.Since(start); d > 50*time.Millisecond {
			t.Errorf("Lookup took %v with the API server down", d)
		}
		if diff := cmp.Diff(want, got); !ok || diff != "" {
			t.Errorf("with the API server down: (-want +got)\n%s", diff)
		}
		eventuallyDetail(t, 15*time.Second, "a warning about the lost watch", func() (bool, string) {
			return observed.FilterLevelExact(zapcore.WarnLevel).Len() > 0, fmt.Sprint(observed.All())
		})
	})
}

func withRestartAlways(t corev1.PodTemplateSpec) corev1.PodTemplateSpec {
	t.Spec.RestartPolicy = corev1.RestartPolicyAlways
	return t
}

// watchOnce opens a watch with a field selector and closes it.
func watchOnce(ctx context.Context, r dynamic.NamespaceableResourceInterface, fieldSelector string) error {
	w, err := r.Watch(ctx, metav1.ListOptions{FieldSelector: fieldSelector})
	if err != nil {
		return err
	}
	w.Stop()
	return nil
}

func TestNewKubernetesNeedsConfigAndNode(t *testing.T) {
	if _, err := NewKubernetes(KubernetesConfig{NodeName: testNode}); err == nil {
		t.Error("no REST configuration: no error")
	}
	if _, err := NewKubernetes(KubernetesConfig{REST: &rest.Config{Host: "https://127.0.0.1:1"}}); err == nil {
		t.Error("no node name: no error")
	}
}

// The environment of a container says which identity it has, as the EKS
// pod identity webhook and EKS Pod Identity set it.
func TestIdentityOf(t *testing.T) {
	for _, c := range []struct {
		env  []envVar
		want string
	}{
		{nil, ""},
		{[]envVar{{Name: envRoleARN, Value: "arn:aws:iam::1:role/x"}, {Name: envWebIdentityTokenFile, Value: "/t"}}, IdentityIRSA},
		{[]envVar{{Name: envRoleARN, Value: "arn:aws:iam::1:role/x"}}, ""},
		{[]envVar{{Name: envRoleARN, FromSource: &struct{}{}}, {Name: envWebIdentityTokenFile, Value: "/t"}}, IdentityIRSA},
		{[]envVar{{Name: envCredentialsFullURI, Value: "http://169.254.170.23/v1/credentials"}}, IdentityPodIdentity},
		{[]envVar{{Name: envCredentialsFullURI, Value: "http://[fd00:ec2::23]/v1/credentials"}}, IdentityPodIdentity},
		{[]envVar{{Name: envCredentialsFullURI, Value: "http://[FD00:EC2:0::23]:80/v1/credentials"}}, IdentityPodIdentity},
		{[]envVar{{Name: envCredentialsFullURI, Value: "http://169.254.170.2/v2/credentials/x"}}, ""},
		{[]envVar{{Name: envCredentialsFullURI, Value: "http://169.254.170.23.example.com/"}}, ""},
		{[]envVar{{Name: "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", Value: "/v2/credentials/x"}}, ""},
	} {
		if got := identityOf(c.env); got != c.want {
			t.Errorf("identityOf(%+v) = %q, want %q", c.env, got, c.want)
		}
	}
}
