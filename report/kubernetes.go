//go:build kubernetes

package report

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr/funcr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
	"k8s.io/klog/v2"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/inject"
	"github.com/imds-proxy/imds-proxy/proxy"
)

// Bounds on reading the cluster's proxies.
const (
	// parallelReads is how many proxies are read at once.
	parallelReads = 8
	// readTimeout bounds one proxy's port-forward and answer.
	readTimeout = 20 * time.Second
	// maxCallersBody bounds one /v1-callers answer (its table holds at
	// most 1024 rows by default).
	maxCallersBody = 16 << 20
)

// FromKubernetes is the inventory of the cluster that cfg reaches, for a
// cluster without Prometheus. It finds the proxies (the running pods with a
// container named imds-proxy: node agents and injected sidecars) and reads
// each one's /v1-callers through a port-forward, as kubectl port-forward
// does. A port-forward reaches the admin listener where it is: on a node
// agent's loopback, which the API server's pod proxy cannot reach (it only
// proxies to a pod's IP), and which would otherwise have to be opened to
// the VPC. The caller needs to list pods, and get and create
// pods/portforward (deploy/kubernetes/report is that ClusterRole).
func FromKubernetes(ctx context.Context, cfg *rest.Config, at time.Time) (*Inventory, error) {
	// A REST client of the core group that decodes only refusals, with the
	// pods read into the few fields below: the typed clients would add
	// every API group's types to the binary.
	coreCfg := rest.CopyConfig(cfg)
	coreCfg.APIPath, coreCfg.GroupVersion = "/api", &schema.GroupVersion{Version: "v1"}
	// It knows metav1.Status, so that a refusal reads as the API server's
	// own message ("pods is forbidden: User ... cannot list ...").
	statuses := runtime.NewScheme()
	metav1.AddToGroupVersion(statuses, *coreCfg.GroupVersion)
	coreCfg.NegotiatedSerializer = serializer.NewCodecFactory(statuses).WithoutConversion()
	coreCfg.ContentType, coreCfg.AcceptContentTypes = runtime.ContentTypeJSON, runtime.ContentTypeJSON
	client, err := rest.RESTClientFor(coreCfg)
	if err != nil {
		return nil, fmt.Errorf("--kubeconfig: %w", err)
	}
	var pods []pod
	for next := ""; ; {
		result := client.Get().Resource("pods").Param("fieldSelector", "status.phase=Running").Param("limit", "500").
			Param("continue", next).Do(ctx)
		raw, _ := result.Raw()
		if err := result.Error(); err != nil {
			return nil, fmt.Errorf("listing the cluster's pods to find the proxies (the imds-proxy-report ClusterRole grants it): %w", err)
		}
		var list podList
		if err := json.Unmarshal(raw, &list); err != nil {
			return nil, fmt.Errorf("listing the cluster's pods: not a pod list: %w", err)
		}
		pods = append(pods, list.Items...)
		if next = list.Continue; next == "" {
			break
		}
	}

	var (
		mu        sync.Mutex
		read      []ProxyCallers
		unreached []string
		wg        sync.WaitGroup
		slots     = make(chan struct{}, parallelReads)
	)
	for i := range pods {
		pod := &pods[i]
		port, ok := adminPort(pod)
		if !ok {
			continue
		}
		wg.Add(1)
		slots <- struct{}{}
		go func() {
			defer func() { <-slots; wg.Done() }()
			callers, err := readCallers(ctx, cfg, client, pod, port)
			mu.Lock()
			defer mu.Unlock()
			name := pod.Namespace + "/" + pod.Name
			if err != nil {
				unreached = append(unreached, name+": "+err.Error())
				return
			}
			p := ProxyCallers{Proxy: name, Callers: callers}
			if !pod.Spec.HostNetwork { // a sidecar: its rows are its own pod's
				p.Namespace, p.Workload = pod.Namespace, podWorkload(pod)
			}
			read = append(read, p)
		}()
	}
	wg.Wait()
	slices.Sort(unreached)
	if len(read) == 0 && len(unreached) > 0 {
		return nil, fmt.Errorf("no proxy answered: %s", strings.Join(unreached, "; "))
	}
	return FromCallers(read, unreached, at), nil
}

// podList and pod are what the report reads of the cluster's pods.
type podList struct {
	metav1.ListMeta `json:"metadata"`
	Items           []pod `json:"items"`
}

type pod struct {
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		HostNetwork    bool        `json:"hostNetwork"`
		Containers     []container `json:"containers"`
		InitContainers []container `json:"initContainers"`
	} `json:"spec"`
}

type container struct {
	Name string   `json:"name"`
	Args []string `json:"args"`
}

// adminPort is the port of the pod's imds-proxy admin listener (its
// --metrics-listen, by default imdsapi.AdminPort), if the pod runs one: as
// a container or, injected as a native sidecar, as an init container.
func adminPort(pod *pod) (string, bool) {
	for _, c := range append(pod.Spec.InitContainers, pod.Spec.Containers...) {
		if c.Name != inject.ContainerName {
			continue
		}
		port := strconv.Itoa(imdsapi.AdminPort)
		for i, arg := range c.Args {
			value, found := strings.CutPrefix(arg, "--metrics-listen=")
			if !found && arg == "--metrics-listen" && i+1 < len(c.Args) {
				value, found = c.Args[i+1], true
			}
			if _, p, err := net.SplitHostPort(value); found && err == nil {
				port = p
			}
		}
		return port, true
	}
	return "", false
}

// podWorkload names a pod's workload as the node agents do, from the pod
// alone: a ReplicaSet named for its pods' pod-template-hash is a
// Deployment's, any other controller names itself, and a pod without one
// is its own workload.
func podWorkload(pod *pod) string {
	ref := metav1.GetControllerOfNoCopy(&pod.ObjectMeta)
	switch {
	case ref == nil || ref.Kind == "Node":
		return "Pod/" + pod.Name
	case ref.Kind == "ReplicaSet":
		if hash := pod.Labels["pod-template-hash"]; hash != "" {
			if deployment, ok := strings.CutSuffix(ref.Name, "-"+hash); ok {
				return "Deployment/" + deployment
			}
		}
	}
	return ref.Kind + "/" + ref.Name
}

// readCallers forwards a loopback port to the pod's admin port through the
// API server and reads /v1-callers through it.
func readCallers(ctx context.Context, cfg *rest.Config, client *rest.RESTClient, pod *pod, port string) ([]proxy.V1Caller, error) {
	ctx, cancel := context.WithTimeout(ctx, readTimeout)
	defer cancel()
	url := client.Post().Resource("pods").Namespace(pod.Namespace).Name(pod.Name).SubResource("portforward").URL()
	transport, upgrader, err := spdy.RoundTripperFor(cfg)
	if err != nil {
		return nil, err
	}
	websocket, err := portforward.NewSPDYOverWebsocketDialer(url, cfg)
	if err != nil {
		return nil, err
	}
	// WebSockets first, as kubectl port-forward: an API server or proxy
	// that refuses them gets SPDY.
	dialer := portforward.NewFallbackDialer(websocket, spdy.NewDialer(upgrader, &http.Client{Transport: transport}, http.MethodPost, url),
		func(err error) bool { return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err) })
	ready := make(chan struct{})
	// The port-forwarder logs why a connection through it failed (the
	// kubelet's answer) rather than returning it: keep it for the report.
	failure := &lastFailure{}
	forwarder, err := portforward.NewOnAddressesWithContext(klog.NewContext(ctx, funcr.New(failure.record, funcr.Options{})),
		dialer, []string{"127.0.0.1"}, []string{"0:" + port}, ready, io.Discard, io.Discard)
	if err != nil {
		return nil, err
	}
	forwarding := make(chan error, 1)
	go func() { forwarding <- forwarder.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-forwarding:
		return nil, fmt.Errorf("port-forward to port %s: %w", port, err)
	case <-ctx.Done():
		return nil, fmt.Errorf("port-forward to port %s: %w", port, ctx.Err())
	}
	local, err := forwarder.GetPorts()
	if err != nil || len(local) != 1 {
		return nil, fmt.Errorf("port-forward to port %s: no local port: %v", port, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/v1-callers", local[0].Local), nil)
	if err != nil {
		return nil, err
	}
	// One request: the connection closes after it, and so does its stream.
	resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
	if err != nil {
		if why := failure.String(); why != "" {
			return nil, fmt.Errorf("port-forward to port %s: %s", port, why)
		}
		return nil, fmt.Errorf("GET /v1-callers on port %s: %w", port, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /v1-callers on port %s: %s", port, resp.Status)
	}
	var callers []proxy.V1Caller
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxCallersBody)).Decode(&callers); err != nil {
		return nil, fmt.Errorf("GET /v1-callers on port %s: not a callers table: %w", port, err)
	}
	return callers, nil
}

// lastFailure keeps the last error the port-forwarder logged.
type lastFailure struct {
	mu   sync.Mutex
	line string
}

// record keeps the error of a log line that funcr formatted, such as
// "msg"="An error occurred forwarding" "error"="... does not run on node ...".
func (l *lastFailure) record(_, args string) {
	_, quoted, found := strings.Cut(args, `"error"=`)
	if !found {
		return
	}
	if prefix, err := strconv.QuotedPrefix(quoted); err == nil {
		quoted, _ = strconv.Unquote(prefix)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.line = quoted
}

func (l *lastFailure) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.line
}
