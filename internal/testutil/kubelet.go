package testutil

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cri-streaming/pkg/streaming/portforward"
)

// Kubelet is a stand-in for a node's kubelet, serving the one kubelet API
// the tests need: port-forward (/portForward/<namespace>/<pod>), with the
// kubelet's own streaming server (k8s.io/cri-streaming). Where a kubelet
// asks the container runtime to connect inside the pod's sandbox, it
// connects to localhost in the network namespace the test says the pod
// runs in, as containerd does. It does not authenticate the API server.
type Kubelet struct {
	// Node is the Node object's name.
	Node string

	mu   sync.Mutex
	pods map[string]*Netns // "namespace/name" -> where it runs
}

// StartKubelet starts a kubelet stand-in on 127.0.0.1 with a serving
// certificate of the API server's CA, and stores the Node object that leads
// the API server to it: InternalIP 127.0.0.1 and its port in
// status.daemonEndpoints.
func (s *KubeAPIServer) StartKubelet(t testing.TB, node string) *Kubelet {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(s.certs.kubeletCert, s.certs.kubeletKey)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	k := &Kubelet{Node: node, pods: map[string]*Netns{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /portForward/{namespace}/{pod}", k.servePortForward)
	mux.HandleFunc("GET /portForward/{namespace}/{pod}", k.servePortForward) // WebSocket clients
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })

	kube := s.Client(t)
	KubeCreate(kube, &corev1.Node{TypeMeta: metav1.TypeMeta{Kind: "Node", APIVersion: "v1"}, ObjectMeta: metav1.ObjectMeta{Name: node}})
	port := ln.Addr().(*net.TCPAddr).Port
	kube.Patch("Node", "", node, map[string]any{"status": map[string]any{
		"addresses":       []map[string]string{{"type": "InternalIP", "address": "127.0.0.1"}},
		"daemonEndpoints": map[string]any{"kubeletEndpoint": map[string]int{"Port": port}},
	}}, "status")
	return k
}

// Runs says that the pod runs in ns: port-forwards to it connect there.
func (k *Kubelet) Runs(pod *corev1.Pod, ns *Netns) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.pods[pod.Namespace+"/"+pod.Name] = ns
}

func (k *Kubelet) servePortForward(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("namespace") + "/" + r.PathValue("pod")
	options, err := portforward.NewV4Options(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	portforward.ServePortForward(w, r, k, name, "", options, time.Minute, 30*time.Second, portforward.SupportedProtocols)
}

// PortForward implements portforward.PortForwarder: it connects to port on
// localhost in the pod's network namespace and copies both ways.
func (k *Kubelet) PortForward(ctx context.Context, name, _ string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	k.mu.Lock()
	ns := k.pods[name]
	k.mu.Unlock()
	if ns == nil {
		return fmt.Errorf("pod %s does not run on node %s", name, k.Node)
	}
	var conn net.Conn
	var dialErr error
	if err := ns.Enter(func() {
		d := net.Dialer{Timeout: 5 * time.Second}
		conn, dialErr = d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	}); err != nil {
		return err
	}
	if dialErr != nil {
		return fmt.Errorf("pod %s, port %d: %w", name, port, dialErr)
	}
	defer conn.Close()
	go func() {
		_, _ = io.Copy(conn, stream)
		_ = conn.(*net.TCPConn).CloseWrite()
	}()
	// Done when the pod's side closes, as containerd's port-forward is.
	_, _ = io.Copy(stream, conn)
	return nil
}
