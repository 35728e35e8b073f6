//go:build kubernetes

package report

import (
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestProxyPods: a pod runs a proxy if a container or an init container
// (a native sidecar) is named imds-proxy; its admin port is its
// --metrics-listen's, in either spelling, or 9169; and a sidecar's
// workload is named from the pod alone.
func TestProxyPods(t *testing.T) {
	controller := true
	owned := func(kind, name string) []metav1.OwnerReference {
		return []metav1.OwnerReference{{Kind: kind, Name: name, Controller: &controller}}
	}
	newPod := func(meta metav1.ObjectMeta, containers, initContainers []container) pod {
		p := pod{ObjectMeta: meta}
		p.Spec.Containers, p.Spec.InitContainers = containers, initContainers
		return p
	}
	for _, c := range []struct {
		name     string
		pod      pod
		port     string
		workload string
	}{
		{"node agent", newPod(metav1.ObjectMeta{Name: "imds-proxy-node-x", OwnerReferences: owned("DaemonSet", "imds-proxy-node")},
			[]container{{Name: "imds-proxy", Args: []string{"node", "--metrics-listen=127.0.0.1:9169"}}}, nil),
			"9169", "DaemonSet/imds-proxy-node"},
		{"native sidecar of a Deployment", newPod(metav1.ObjectMeta{Name: "api-7c9d5b8f4-k2x9z",
			Labels: map[string]string{"pod-template-hash": "7c9d5b8f4"}, OwnerReferences: owned("ReplicaSet", "api-7c9d5b8f4")},
			[]container{{Name: "app"}}, []container{{Name: "imds-proxy", Args: []string{"sidecar", "--metrics-listen", ":19169"}}}),
			"19169", "Deployment/api"},
		{"ReplicaSet of its own", newPod(metav1.ObjectMeta{Name: "rs-1",
			Labels: map[string]string{"pod-template-hash": "abc"}, OwnerReferences: owned("ReplicaSet", "rs")},
			[]container{{Name: "imds-proxy", Args: []string{"sidecar"}}}, nil),
			"9169", "ReplicaSet/rs"},
		{"bare pod", newPod(metav1.ObjectMeta{Name: "debug"}, []container{{Name: "imds-proxy"}}, nil), "9169", "Pod/debug"},
		{"no proxy", newPod(metav1.ObjectMeta{Name: "web"}, []container{{Name: "app", Args: []string{"--metrics-listen=:9169"}}}, nil),
			"", "Pod/web"},
	} {
		port, ok := adminPort(&c.pod)
		if port != c.port || ok != (c.port != "") {
			t.Errorf("%s: admin port %q %v, want %q", c.name, port, ok, c.port)
		}
		if got := podWorkload(&c.pod); got != c.workload {
			t.Errorf("%s: workload %q, want %q", c.name, got, c.workload)
		}
	}
}

// TestLastFailure keeps the error of the port-forwarder's log line, the
// kubelet's reason, unquoted.
func TestLastFailure(t *testing.T) {
	var f lastFailure
	f.record("", `"msg"="An error occurred forwarding" "error"="pod a/b does not run on \"node\"" "localPort"=1 "remotePort"=9169`)
	f.record("", `"level"=4 "msg"="Handling connection"`)
	if got := f.String(); got != `pod a/b does not run on "node"` {
		t.Errorf("got %q", got)
	}
}
