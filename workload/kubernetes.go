//go:build kubernetes

package workload

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/imds-proxy/imds-proxy/internal/attribution"
)

// The Kubernetes annotations and environment variables the source reads.
const (
	// IRSARoleAnnotation on a service account gives its pods an IAM role
	// (IRSA): the EKS pod identity webhook then injects AWS_ROLE_ARN and
	// AWS_WEB_IDENTITY_TOKEN_FILE into their containers.
	IRSARoleAnnotation = "eks.amazonaws.com/role-arn"
)

// What a container's environment says about its AWS identity: the EKS pod
// identity webhook injects AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE
// (IRSA); EKS Pod Identity injects AWS_CONTAINER_CREDENTIALS_FULL_URI
// pointing at its node agent, http://169.254.170.23/v1/credentials or
// http://[fd00:ec2::23]/v1/credentials, with
// AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE.
const (
	envRoleARN              = "AWS_ROLE_ARN"
	envWebIdentityTokenFile = "AWS_WEB_IDENTITY_TOKEN_FILE"
	envCredentialsFullURI   = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
)

var podIdentityAgents = []net.IP{net.ParseIP("169.254.170.23"), net.ParseIP("fd00:ec2::23")}

// The resources the source reads. Pods are watched with their spec and
// status; namespaces are watched, and owners and service accounts read
// one at a time, as metadata only (PartialObjectMetadata).
var (
	namespacesResource      = coreV1.WithResource("namespaces")
	serviceAccountsResource = coreV1.WithResource("serviceaccounts")
	replicaSetsResource     = schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "replicasets"}
	jobsResource            = schema.GroupVersionResource{Group: "batch", Version: "v1", Resource: "jobs"}
)

// KubernetesConfig configures the Kubernetes source.
type KubernetesConfig struct {
	// REST reaches the API server (in-cluster configuration, or a
	// kubeconfig). Required.
	REST *rest.Config
	// NodeName is this node's name: the source watches the pods whose
	// spec.nodeName it is. Required.
	NodeName string
	// Log receives what goes wrong, once per kind of trouble; nil logs
	// nothing.
	Log *zap.Logger
	// ServiceAccountRefresh is how often a service account's
	// eks.amazonaws.com/role-arn annotation is read again while pods of
	// this node use it (default 5 minutes).
	ServiceAccountRefresh time.Duration
	// RetryMax caps the backoff between attempts to read an owner or a
	// service account that failed (default 5 minutes; the first retry is
	// after a second).
	RetryMax time.Duration
}

// Kubernetes is the workload source of a Kubernetes node: the pods of this
// node and the namespaces, from informers (list and watch), with each
// pod's top owner (ReplicaSet -> Deployment, Job -> CronJob) and its
// service account's IRSA annotation read once in the background. Lookup
// and LookupAddr (it is an AddressSource: pods' IPs) answer from those
// caches only.
//
// RBAC it needs (deploy/kubernetes/node/rbac.yaml): get, list and watch
// pods; list and watch namespaces; get replicasets, jobs and
// serviceaccounts. Without some of it, what it can read is still served.
type Kubernetes struct {
	log       *zap.Logger
	node      string
	pods      cache.SharedIndexInformer
	nss       cache.SharedIndexInformer
	http      *http.Client
	meta      metadata.Interface
	queue     workqueue.TypedRateLimitingInterface[objectRef]
	saRefresh time.Duration

	mu     sync.RWMutex
	owners map[types.UID]string // a ReplicaSet's or Job's UID -> the pod's top owner, "Deployment/web"
	sas    map[string]saInfo    // "namespace/name" -> what the service account says
	// pending are the objects queued or waiting to be retried, so
	// that pod updates do not cut a retry's backoff short.
	pending map[objectRef]bool
	warned  map[string]bool // the kinds of trouble logged since they last cleared
}

type saInfo struct {
	roleARN string
}

// objectRef is an object to read in the background: a pod's controlling
// ReplicaSet or Job (with its UID), or a pod's service account.
type objectRef struct {
	resource  schema.GroupVersionResource
	namespace string
	name      string
	uid       types.UID
}

const (
	podUIDIndex      = "uid"
	containerIDIndex = "containerID"
	podIPIndex       = "ip"
	defaultSARefresh = 5 * time.Minute
	defaultRetryMax  = 5 * time.Minute
	requestTimeout   = 10 * time.Second
	pruneEvery       = 10 * time.Minute
	defaultUserAgent = "imds-proxy-node"
)

// NewKubernetes makes the source; Run starts it.
func NewKubernetes(cfg KubernetesConfig) (*Kubernetes, error) {
	if cfg.REST == nil {
		return nil, errors.New("kubernetes source: no API server configuration")
	}
	if cfg.NodeName == "" {
		return nil, errors.New("kubernetes source: no node name")
	}
	log := cfg.Log
	if log == nil {
		log = zap.NewNop()
	}
	log = log.With(zap.String("source", "kubernetes"), zap.String("node", cfg.NodeName))
	if cfg.ServiceAccountRefresh <= 0 {
		cfg.ServiceAccountRefresh = defaultSARefresh
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = defaultRetryMax
	}

	restCfg := rest.CopyConfig(cfg.REST)
	if restCfg.UserAgent == "" {
		restCfg.UserAgent = defaultUserAgent
	}
	restCfg.WarningHandlerWithContext = warningLogger{log}
	restCfg.WarningHandler = nil
	// A client timeout would cut every watch short; each GET has its own.
	restCfg.Timeout = 0
	httpClient, err := rest.HTTPClientFor(restCfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes source: %w", err)
	}
	meta, err := metadata.NewForConfigAndClient(restCfg, httpClient)
	if err != nil {
		return nil, fmt.Errorf("kubernetes source: %w", err)
	}
	podCfg := rest.CopyConfig(restCfg)
	podCfg.APIPath = "/api"
	podCfg.GroupVersion = &coreV1
	podCfg.NegotiatedSerializer = podCodecs.WithoutConversion()
	podCfg.ContentType = runtime.ContentTypeJSON
	podCfg.AcceptContentTypes = runtime.ContentTypeJSON
	core, err := rest.RESTClientForConfigAndClient(podCfg, httpClient)
	if err != nil {
		return nil, fmt.Errorf("kubernetes source: %w", err)
	}

	k := &Kubernetes{
		log:       log,
		node:      cfg.NodeName,
		http:      httpClient,
		meta:      meta,
		saRefresh: cfg.ServiceAccountRefresh,
		owners:    map[types.UID]string{},
		sas:       map[string]saInfo{},
		warned:    map[string]bool{},
		pending:   map[objectRef]bool{},
		queue: workqueue.NewTypedRateLimitingQueue(
			workqueue.NewTypedItemExponentialFailureRateLimiter[objectRef](time.Second, cfg.RetryMax)),
	}

	podsLW := k.reporting("pods", cache.NewListWatchFromClient(core, "pods", metav1.NamespaceAll,
		fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName)))
	k.pods = cache.NewSharedIndexInformerWithOptions(podsLW, &podObject{}, cache.SharedIndexInformerOptions{
		Indexers:          cache.Indexers{podUIDIndex: indexPodUID, containerIDIndex: indexContainerIDs, podIPIndex: indexPodIPs},
		ObjectDescription: "pods of node " + cfg.NodeName,
	})
	nsClient := meta.Resource(namespacesResource)
	k.nss = cache.NewSharedIndexInformerWithOptions(k.reporting("namespaces", &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return nsClient.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return nsClient.Watch(ctx, o)
		},
	}), &metav1.PartialObjectMetadata{}, cache.SharedIndexInformerOptions{ObjectDescription: "namespaces"})

	for _, inf := range []cache.SharedIndexInformer{k.pods, k.nss} {
		if err := inf.SetTransform(stripObject); err != nil {
			return nil, err
		}
	}
	if err := k.pods.SetWatchErrorHandlerWithContext(k.watchError("pods")); err != nil {
		return nil, err
	}
	if err := k.nss.SetWatchErrorHandlerWithContext(k.watchError("namespaces")); err != nil {
		return nil, err
	}
	if _, err := k.pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { k.podSeen(obj) },
		UpdateFunc: func(_, obj any) { k.podSeen(obj) },
	}); err != nil {
		return nil, err
	}
	return k, nil
}

// Run keeps the caches current until ctx ends, and returns once
// everything it started has stopped. Call it once.
func (k *Kubernetes) Run(ctx context.Context) {
	defer k.http.CloseIdleConnections()
	var wg sync.WaitGroup
	wg.Go(func() { k.pods.RunWithContext(ctx) })
	wg.Go(func() { k.nss.RunWithContext(ctx) })
	wg.Go(func() {
		for k.processNext(ctx) {
		}
	})
	wg.Go(func() {
		t := time.NewTicker(pruneEvery)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				k.prune()
			}
		}
	})
	<-ctx.Done()
	k.queue.ShutDown()
	wg.Wait()
}

// Synced says whether the pods and namespaces have been listed once.
func (k *Kubernetes) Synced() bool { return k.pods.HasSynced() && k.nss.HasSynced() }

// Lookup finds the pod of c in the cache, by c.PodUID, else by c.ID among
// the pods' container statuses. It never waits on the network.
func (k *Kubernetes) Lookup(c attribution.Container) (Workload, bool) {
	pod := k.podOf(c)
	if pod == nil {
		return Workload{}, false
	}
	return k.workloadOf(pod, c.ID), true
}

// LookupAddr finds the pod with address addr among the running pods of
// this node with their own network namespace (a hostNetwork pod's address
// is the node's), for a caller that could not be traced to its container.
// An address two such pods claim (a stale status) names neither.
func (k *Kubernetes) LookupAddr(addr netip.Addr) (Workload, bool) {
	objs, _ := k.pods.GetIndexer().ByIndex(podIPIndex, addr.Unmap().String())
	if len(objs) != 1 {
		return Workload{}, false
	}
	pod, ok := objs[0].(*podObject)
	if !ok {
		return Workload{}, false
	}
	return k.workloadOf(pod, ""), true
}

// workloadOf is the workload of the pod's container with runtime ID id,
// or of the pod when no container of its status has that ID.
func (k *Kubernetes) workloadOf(pod *podObject, id string) Workload {
	w := Workload{
		Platform:       "kubernetes",
		Namespace:      pod.Namespace,
		Name:           k.topOwner(pod),
		Pod:            pod.Name,
		ServiceAccount: pod.Spec.ServiceAccountName,
		Settings:       k.settings(pod),
	}
	var env []envVar
	if name := containerName(pod, id); name != "" {
		w.Container = name
		w.Image, env = containerSpec(pod, name)
		w.OwnIdentity = identityOf(env)
	} else {
		w.OwnIdentity = podIdentity(pod)
	}
	if w.OwnIdentity == "" {
		k.mu.RLock()
		sa := k.sas[pod.Namespace+"/"+pod.Spec.ServiceAccountName]
		k.mu.RUnlock()
		if sa.roleARN != "" {
			w.OwnIdentity = IdentityIRSA
		}
	}
	return w
}

func (k *Kubernetes) podOf(c attribution.Container) *podObject {
	idx := k.pods.GetIndexer()
	var objs []any
	if c.PodUID != "" {
		objs, _ = idx.ByIndex(podUIDIndex, c.PodUID)
	}
	if len(objs) == 0 && c.ID != "" {
		objs, _ = idx.ByIndex(containerIDIndex, c.ID)
	}
	for _, o := range objs {
		if pod, ok := o.(*podObject); ok {
			return pod
		}
	}
	return nil
}

// topOwner names the pod's workload: its controller's controller where the
// background resolved it (Deployment, CronJob), else its controller, else
// the pod itself.
func (k *Kubernetes) topOwner(pod *podObject) string {
	ref := metav1.GetControllerOfNoCopy(pod)
	if ref == nil || ref.Kind == "Node" { // a static pod's mirror is owned by its node
		return "Pod/" + pod.Name
	}
	if resolvable(ref) != nil {
		k.mu.RLock()
		top, ok := k.owners[ref.UID]
		k.mu.RUnlock()
		if ok {
			return top
		}
	}
	return ref.Kind + "/" + ref.Name
}

// resolvable is the resource of an owner whose own owner names the
// workload: a ReplicaSet (its Deployment) or a Job (its CronJob).
func resolvable(ref *metav1.OwnerReference) *schema.GroupVersionResource {
	group, _, _ := strings.Cut(ref.APIVersion, "/")
	switch {
	case ref.Kind == "ReplicaSet" && group == "apps":
		return &replicaSetsResource
	case ref.Kind == "Job" && group == "batch":
		return &jobsResource
	}
	return nil
}

// settings: the namespace's imds-proxy.io/* annotations, overlaid by the
// pod's.
func (k *Kubernetes) settings(pod *podObject) map[string]string {
	var namespace map[string]string
	if obj, ok, _ := k.nss.GetStore().GetByKey(pod.Namespace); ok {
		if ns, ok := obj.(*metav1.PartialObjectMetadata); ok {
			namespace = ns.Annotations
		}
	}
	return settings(namespace, pod.Annotations)
}

// runtimeID is the runtime's ID in a container status's containerID,
// "containerd://<id>" (also cri-o://, docker://).
func runtimeID(containerID string) string {
	if _, id, ok := strings.Cut(containerID, "://"); ok {
		return id
	}
	return containerID
}

func allStatuses(pod *podObject) [][]containerStatus {
	return [][]containerStatus{pod.Status.ContainerStatuses, pod.Status.InitContainerStatuses, pod.Status.EphemeralContainerStatuses}
}

func containerName(pod *podObject, id string) string {
	if id == "" {
		return ""
	}
	for _, statuses := range allStatuses(pod) {
		for _, s := range statuses {
			if runtimeID(s.ContainerID) == id {
				return s.Name
			}
		}
	}
	return ""
}

// containerSpec is the image and environment of the pod's container name.
func containerSpec(pod *podObject, name string) (string, []envVar) {
	for _, c := range pod.Spec.Containers {
		if c.Name == name {
			return c.Image, c.Env
		}
	}
	for _, c := range pod.Spec.InitContainers {
		if c.Name == name {
			return c.Image, c.Env
		}
	}
	for _, c := range pod.Spec.EphemeralContainers {
		if c.Name == name {
			return c.Image, c.Env
		}
	}
	return "", nil
}

// identityOf is the AWS identity a container's environment gives it
// instead of the node's role.
func identityOf(env []envVar) string {
	var roleARN, tokenFile bool
	for _, e := range env {
		switch e.Name {
		case envRoleARN:
			roleARN = e.Value != "" || e.FromSource != nil
		case envWebIdentityTokenFile:
			tokenFile = e.Value != "" || e.FromSource != nil
		case envCredentialsFullURI:
			if isPodIdentityAgent(e.Value) {
				return IdentityPodIdentity
			}
		}
	}
	if roleARN && tokenFile {
		return IdentityIRSA
	}
	return ""
}

func isPodIdentityAgent(uri string) bool {
	u, err := url.Parse(uri)
	if err != nil {
		return false
	}
	ip := net.ParseIP(u.Hostname())
	for _, agent := range podIdentityAgents {
		if ip.Equal(agent) {
			return true
		}
	}
	return false
}

// podIdentity is the identity every app container of the pod has, for a
// container the pod's status does not name yet.
func podIdentity(pod *podObject) string {
	identity := ""
	for i, c := range pod.Spec.Containers {
		id := identityOf(c.Env)
		if i > 0 && id != identity {
			return ""
		}
		identity = id
	}
	return identity
}

func indexPodUID(obj any) ([]string, error) {
	if pod, ok := obj.(*podObject); ok {
		return []string{string(pod.UID)}, nil
	}
	return nil, nil
}

// indexPodIPs indexes the addresses of the pods that run in a network
// namespace of their own and have not terminated (whose address may be
// another pod's by now).
func indexPodIPs(obj any) ([]string, error) {
	pod, ok := obj.(*podObject)
	if !ok || pod.Spec.HostNetwork || pod.Status.Phase == "Succeeded" || pod.Status.Phase == "Failed" {
		return nil, nil
	}
	var ips []string
	for _, ip := range pod.Status.PodIPs {
		if addr, err := netip.ParseAddr(ip.IP); err == nil {
			ips = append(ips, addr.Unmap().String())
		}
	}
	return ips, nil
}

func indexContainerIDs(obj any) ([]string, error) {
	pod, ok := obj.(*podObject)
	if !ok {
		return nil, nil
	}
	var ids []string
	for _, statuses := range allStatuses(pod) {
		for _, s := range statuses {
			if id := runtimeID(s.ContainerID); id != "" {
				ids = append(ids, id)
			}
		}
	}
	return ids, nil
}

// stripObject drops what the source never reads before an object is
// cached: managed fields, and a namespace's labels.
func stripObject(obj any) (any, error) {
	switch o := obj.(type) {
	case *podObject:
		o.ManagedFields = nil
	case *metav1.PartialObjectMetadata:
		o.ManagedFields = nil
		o.Labels = nil
	}
	return obj, nil
}

// podSeen queues what a pod needs read in the background: its controller
// (ReplicaSet or Job) and its service account, unless already known.
func (k *Kubernetes) podSeen(obj any) {
	pod, ok := obj.(*podObject)
	if !ok {
		return
	}
	if ref := metav1.GetControllerOfNoCopy(pod); ref != nil {
		if gvr := resolvable(ref); gvr != nil {
			k.mu.RLock()
			_, known := k.owners[ref.UID]
			k.mu.RUnlock()
			if !known {
				k.enqueue(objectRef{resource: *gvr, namespace: pod.Namespace, name: ref.Name, uid: ref.UID})
			}
		}
	}
	if sa := pod.Spec.ServiceAccountName; sa != "" {
		k.mu.RLock()
		_, known := k.sas[pod.Namespace+"/"+sa]
		k.mu.RUnlock()
		if !known {
			k.enqueue(objectRef{resource: serviceAccountsResource, namespace: pod.Namespace, name: sa})
		}
	}
}

// enqueue queues ref unless it is queued or waiting for a retry already.
func (k *Kubernetes) enqueue(ref objectRef) {
	k.mu.Lock()
	pending := k.pending[ref]
	k.pending[ref] = true
	k.mu.Unlock()
	if !pending {
		k.queue.Add(ref)
	}
}

// done records that ref needs no retry; a refresh may queue it again.
func (k *Kubernetes) done(ref objectRef) {
	k.mu.Lock()
	delete(k.pending, ref)
	k.mu.Unlock()
	k.queue.Forget(ref)
}

func (k *Kubernetes) processNext(ctx context.Context) bool {
	ref, shutdown := k.queue.Get()
	if shutdown {
		return false
	}
	defer k.queue.Done(ref)
	// No pod of this node needs it any more (a retry, a refresh): drop it.
	if ref.resource == serviceAccountsResource && !k.saInUse(ref.namespace, ref.name) {
		k.mu.Lock()
		delete(k.sas, ref.namespace+"/"+ref.name)
		k.mu.Unlock()
		k.done(ref)
		return true
	}
	if ref.resource != serviceAccountsResource && !k.ownerInUse(ref.uid) {
		k.done(ref)
		return true
	}
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	obj, err := k.meta.Resource(ref.resource).Namespace(ref.namespace).Get(rctx, ref.name, metav1.GetOptions{})
	cancel()
	switch {
	case err == nil, apierrors.IsNotFound(err):
		k.clear("get " + ref.resource.Resource)
	case ctx.Err() != nil:
		return true
	default:
		what := "pods' owners (their ReplicaSet or Job is named instead of its Deployment or CronJob)"
		if ref.resource == serviceAccountsResource {
			what = "service accounts (their eks.amazonaws.com/role-arn is not seen)"
		}
		k.warn("get "+ref.resource.Resource, "Kubernetes API: cannot get "+ref.resource.Resource+"; "+what+
			" until it answers; retrying", err, zap.String("namespace", ref.namespace), zap.String("name", ref.name))
		k.queue.AddRateLimited(ref)
		return true
	}
	if ref.resource == serviceAccountsResource {
		var info saInfo
		if obj != nil {
			info.roleARN = obj.Annotations[IRSARoleAnnotation]
		}
		k.mu.Lock()
		k.sas[ref.namespace+"/"+ref.name] = info
		k.mu.Unlock()
		// Read it again later while pods use it (then it is dropped).
		k.queue.Forget(ref)
		k.queue.AddAfter(ref, k.saRefresh)
		return true
	}
	k.done(ref)
	top := ref.resource.Resource
	switch ref.resource {
	case replicaSetsResource:
		top = "ReplicaSet/" + ref.name
	case jobsResource:
		top = "Job/" + ref.name
	}
	// A ReplicaSet or Job of the same name but another UID is not the
	// pod's: it has no owner to tell.
	if obj != nil && obj.UID == ref.uid {
		if owner := metav1.GetControllerOfNoCopy(obj); owner != nil {
			top = owner.Kind + "/" + owner.Name
		}
	}
	k.mu.Lock()
	k.owners[ref.uid] = top
	k.mu.Unlock()
	return true
}

func (k *Kubernetes) saInUse(namespace, name string) bool {
	for _, obj := range k.pods.GetStore().List() {
		if pod, ok := obj.(*podObject); ok && pod.Namespace == namespace && pod.Spec.ServiceAccountName == name {
			return true
		}
	}
	return false
}

func (k *Kubernetes) ownerInUse(uid types.UID) bool {
	for _, obj := range k.pods.GetStore().List() {
		if pod, ok := obj.(*podObject); ok {
			if ref := metav1.GetControllerOfNoCopy(pod); ref != nil && ref.UID == uid {
				return true
			}
		}
	}
	return false
}

// prune forgets the owners no pod of this node has any more.
func (k *Kubernetes) prune() {
	inUse := map[types.UID]bool{}
	for _, obj := range k.pods.GetStore().List() {
		if pod, ok := obj.(*podObject); ok {
			if ref := metav1.GetControllerOfNoCopy(pod); ref != nil {
				inUse[ref.UID] = true
			}
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	for uid := range k.owners {
		if !inUse[uid] {
			delete(k.owners, uid)
		}
	}
}

// warn logs a kind of trouble once, until clear says it is over.
func (k *Kubernetes) warn(kind, msg string, err error, fields ...zap.Field) {
	k.mu.Lock()
	first := !k.warned[kind]
	k.warned[kind] = true
	k.mu.Unlock()
	fields = append(fields, zap.String("what", kind), zap.Error(err), zap.Bool("forbidden", apierrors.IsForbidden(err)))
	if first {
		k.log.Warn(msg, fields...)
	} else {
		k.log.Debug(msg, fields...)
	}
}

func (k *Kubernetes) clear(kind string) {
	k.mu.RLock()
	warned := k.warned[kind]
	k.mu.RUnlock()
	if !warned {
		return
	}
	k.mu.Lock()
	delete(k.warned, kind)
	k.mu.Unlock()
	k.log.Info("Kubernetes API: reading "+strings.TrimPrefix(kind, "get ")+" again", zap.String("what", kind))
}

// reporting reports the outcome of each list and watch call of lw: the
// first failure is logged (the API server cannot be reached, RBAC
// forbids), the next success says it is over.
func (k *Kubernetes) reporting(kind string, lw *cache.ListWatch) *cache.ListWatch {
	report := func(ctx context.Context, err error) {
		switch {
		case err == nil:
			k.clear(kind)
		case ctx.Err() == nil:
			k.warn(kind, "Kubernetes API: cannot list or watch "+kind+"; workloads known so far are kept, "+
				"changes are unseen until it answers", err)
		}
	}
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			obj, err := lw.ListWithContext(ctx, o)
			report(ctx, err)
			return obj, err
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			w, err := lw.WatchWithContext(ctx, o)
			report(ctx, err)
			return w, err
		},
	}
}

// watchError replaces client-go's default handler, which logs through
// klog: the failed calls are logged by reporting, and an ended or expired
// watch is routine (the informer lists again).
func (k *Kubernetes) watchError(kind string) cache.WatchErrorHandlerWithContext {
	return func(ctx context.Context, _ *cache.Reflector, err error) {
		if ctx.Err() == nil {
			k.log.Debug("list and watch ended", zap.String("what", kind), zap.Error(err))
		}
	}
}

// warningLogger logs the API server's warnings (deprecations, say).
type warningLogger struct{ log *zap.Logger }

func (w warningLogger) HandleWarningHeaderWithContext(_ context.Context, code int, _ string, message string) {
	if code == 299 && message != "" {
		w.log.Warn("API server warning", zap.String("warning", message))
	}
}

var (
	_ Source        = (*Kubernetes)(nil)
	_ AddressSource = (*Kubernetes)(nil)
)
