package workload

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/internal/attribution"
)

// The labels the ECS agent puts on every container of a task it starts
// (amazon-ecs-agent, agent/engine/docker_task_engine.go).
const (
	ecsLabelCluster         = "com.amazonaws.ecs.cluster"
	ecsLabelTaskARN         = "com.amazonaws.ecs.task-arn"
	ecsLabelFamily          = "com.amazonaws.ecs.task-definition-family"
	ecsLabelRevision        = "com.amazonaws.ecs.task-definition-version"
	ecsLabelContainerName   = "com.amazonaws.ecs.container-name"
	ecsCredentialsEnv       = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
	dockerPreferredAPI      = "1.41" // docker.io 20.10's; every field read here is unchanged since
	dockerRequestTimeout    = 10 * time.Second
	defaultRetryInterval    = 5 * time.Second
	defaultECSPollInterval  = 5 * time.Second
	maxMetadataResponseSize = 8 << 20
)

// Docker knows the workloads of the containers of a Docker engine from its
// Engine API on a unix socket: each container's name, image and labels,
// inspected once when it appears. Its Settings are the container's
// imds-proxy.io/* labels; a container the ECS agent started (its
// com.amazonaws.ecs.* labels) is an ECS workload. Access to the Engine API
// is root-equivalent on the host; this source only lists, inspects and
// follows events.
type Docker struct {
	socket string
	log    *zap.Logger
	client *http.Client // requests that end (list, inspect, version)
	stream *http.Client // the events stream, which does not
	retry  time.Duration

	mu         sync.RWMutex
	containers map[string]Workload
	// atAddr maps a container's addresses on Docker's networks to its ID.
	atAddr map[netip.Addr]string

	health health
}

// NewDocker returns a source for the Docker engine whose API socket is
// socketPath (/var/run/docker.sock). It holds nothing until Run.
func NewDocker(socketPath string, log *zap.Logger) *Docker {
	if log == nil {
		log = zap.NewNop()
	}
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socketPath)
	}
	return &Docker{
		socket:     socketPath,
		log:        log,
		client:     &http.Client{Timeout: dockerRequestTimeout, Transport: &http.Transport{DialContext: dial, MaxIdleConns: 2}},
		stream:     &http.Client{Transport: &http.Transport{DialContext: dial, ResponseHeaderTimeout: dockerRequestTimeout}},
		retry:      defaultRetryInterval,
		containers: map[string]Workload{},
		atAddr:     map[netip.Addr]string{},
		health:     health{log: log, what: "Docker Engine API", fields: []zap.Field{zap.String("socket", socketPath)}},
	}
}

// Lookup returns the workload of the container whose ID is c.ID, from
// what Run has gathered. Callers must not modify its Settings.
func (d *Docker) Lookup(c attribution.Container) (Workload, bool) {
	if c.ID == "" {
		return Workload{}, false
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	w, ok := d.containers[c.ID]
	return w, ok
}

// LookupAddr returns the workload of the container with address addr on
// one of Docker's networks (a container on the host's network has none).
func (d *Docker) LookupAddr(addr netip.Addr) (Workload, bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	id, ok := d.atAddr[addr]
	if !ok {
		return Workload{}, false
	}
	w, ok := d.containers[id]
	return w, ok
}

// forget drops container id.
func (d *Docker) forget(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.containers, id)
	for addr, holder := range d.atAddr {
		if holder == id {
			delete(d.atAddr, addr)
		}
	}
}

// Run keeps the containers current until ctx ends: it follows the engine's
// container events (create, start, destroy) after listing the containers,
// and starts over, keeping what it knows, whenever the engine cannot be
// reached. An unreachable engine is logged once, and again once it is back.
func (d *Docker) Run(ctx context.Context) {
	defer d.client.CloseIdleConnections()
	for ctx.Err() == nil {
		err := d.session(ctx)
		if ctx.Err() != nil {
			return
		}
		d.health.failed(err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(d.retry):
		}
	}
}

// session negotiates the API version, opens the events stream, lists the
// containers and then applies events until the stream or ctx ends. The
// stream is opened before the list so that no container created or
// destroyed in between is missed.
func (d *Docker) session(ctx context.Context) error {
	version, err := d.negotiate(ctx)
	if err != nil {
		return err
	}
	filters, _ := json.Marshal(map[string][]string{"type": {"container"}, "event": {"create", "start", "destroy"}})
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet,
		"http://docker/v"+version+"/events?filters="+url.QueryEscape(string(filters)), nil)
	if err != nil {
		return err
	}
	resp, err := d.stream.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return apiError(resp)
	}
	if err := d.sync(ctx, version); err != nil {
		return err
	}
	d.health.ok()
	dec := json.NewDecoder(bufio.NewReader(resp.Body))
	for {
		var ev struct {
			Type   string
			Action string
			Actor  struct{ ID string }
		}
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("the events stream ended")
			}
			return fmt.Errorf("reading events: %w", err)
		}
		if ev.Type != "container" || ev.Actor.ID == "" {
			continue
		}
		switch ev.Action {
		case "create":
			if err := d.add(ctx, version, ev.Actor.ID); err != nil && !errors.Is(err, errNoSuchContainer) {
				return err
			}
		case "start":
			// A container gets its addresses when it starts, after it was created.
			if err := d.inspect(ctx, version, ev.Actor.ID); err != nil && !errors.Is(err, errNoSuchContainer) {
				return err
			}
		case "destroy":
			d.forget(ev.Actor.ID)
		}
	}
}

// negotiate picks the API version to speak: 1.41 where the engine accepts
// it, else the nearest it accepts (Docker 29 refuses anything below 1.44;
// what is read here is the same in every version from 1.41 to 1.52).
func (d *Docker) negotiate(ctx context.Context) (string, error) {
	var v struct{ APIVersion, MinAPIVersion string }
	if err := d.get(ctx, "/version", &v); err != nil {
		return "", err
	}
	switch {
	case v.MinAPIVersion != "" && versionLess(dockerPreferredAPI, v.MinAPIVersion):
		return v.MinAPIVersion, nil
	case v.APIVersion != "" && versionLess(v.APIVersion, dockerPreferredAPI):
		return v.APIVersion, nil
	}
	return dockerPreferredAPI, nil
}

// versionLess compares API versions "1.41" and "1.44" as numbers.
func versionLess(a, b string) bool {
	parse := func(s string) (int, int) {
		maj, min, _ := strings.Cut(s, ".")
		x, _ := strconv.Atoi(maj)
		y, _ := strconv.Atoi(min)
		return x, y
	}
	a1, a2 := parse(a)
	b1, b2 := parse(b)
	return a1 < b1 || (a1 == b1 && a2 < b2)
}

// sync lists the containers, inspects those it does not know and forgets
// those gone.
func (d *Docker) sync(ctx context.Context, version string) error {
	var list []struct {
		ID string `json:"Id"`
	}
	if err := d.get(ctx, "/v"+version+"/containers/json?all=1", &list); err != nil {
		return err
	}
	present := make(map[string]bool, len(list))
	for _, c := range list {
		present[c.ID] = true
		d.mu.RLock()
		_, known := d.containers[c.ID]
		d.mu.RUnlock()
		if known {
			continue
		}
		if err := d.add(ctx, version, c.ID); err != nil && !errors.Is(err, errNoSuchContainer) {
			return err
		}
	}
	d.mu.RLock()
	var gone []string
	for id := range d.containers {
		if !present[id] {
			gone = append(gone, id)
		}
	}
	d.mu.RUnlock()
	for _, id := range gone {
		d.forget(id)
	}
	return nil
}

var errNoSuchContainer = errors.New("no such container")

// add inspects a container it does not know yet and holds its workload.
func (d *Docker) add(ctx context.Context, version, id string) error {
	d.mu.RLock()
	_, known := d.containers[id]
	d.mu.RUnlock()
	if known {
		return nil
	}
	return d.inspect(ctx, version, id)
}

// inspect reads container id and holds its workload and addresses. The
// environment is read only for whether it names an ECS task role; no value
// of it is kept or logged.
func (d *Docker) inspect(ctx context.Context, version, id string) error {
	var c struct {
		ID     string `json:"Id"`
		Name   string
		Config struct {
			Image  string
			Labels map[string]string
			Env    []string
		}
		NetworkSettings struct {
			Networks map[string]struct{ IPAddress, GlobalIPv6Address string }
		}
	}
	if err := d.get(ctx, "/v"+version+"/containers/"+url.PathEscape(id)+"/json", &c); err != nil {
		var se *statusError
		if errors.As(err, &se) && se.code == http.StatusNotFound {
			return errNoSuchContainer // destroyed since it was listed; its destroy event follows
		}
		return err
	}
	taskRole := false
	for _, e := range c.Config.Env {
		if name, _, _ := strings.Cut(e, "="); name == ecsCredentialsEnv {
			taskRole = true
		}
	}
	c.Config.Env = nil
	w := dockerWorkload(strings.TrimPrefix(c.Name, "/"), c.Config.Image, c.Config.Labels, taskRole)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.containers[id] = w
	for _, n := range c.NetworkSettings.Networks {
		for _, text := range []string{n.IPAddress, n.GlobalIPv6Address} {
			if addr, err := netip.ParseAddr(text); err == nil {
				d.atAddr[addr] = id
			}
		}
	}
	return nil
}

// dockerWorkload is the workload of a container with these name, image and
// labels: an ECS task's where the ECS agent labelled it.
func dockerWorkload(name, image string, labels map[string]string, taskRole bool) Workload {
	w := Workload{Platform: "docker", Name: name, Container: name, Image: image, Settings: settings(labels)}
	if arn := labels[ecsLabelTaskARN]; arn != "" {
		w.Platform = "ecs"
		w.Namespace = clusterName(labels[ecsLabelCluster])
		w.Name = taskDefinition(labels[ecsLabelFamily], labels[ecsLabelRevision])
		w.Pod = arn
		if n := labels[ecsLabelContainerName]; n != "" {
			w.Container = n
		}
	}
	if taskRole {
		w.OwnIdentity = IdentityTaskRole
	}
	return w
}

// clusterName is the cluster's short name: the ECS agent and the task
// metadata endpoint give either it or the cluster's ARN
// (arn:aws:ecs:REGION:ACCOUNT:cluster/NAME).
func clusterName(cluster string) string {
	if strings.HasPrefix(cluster, "arn:") {
		if _, name, ok := strings.Cut(cluster, ":cluster/"); ok {
			return name
		}
	}
	return cluster
}

// taskDefinition names a task definition "family:revision".
func taskDefinition(family, revision string) string {
	if revision == "" {
		return family
	}
	return family + ":" + revision
}

// get decodes the JSON answer of one Engine API request.
func (d *Docker) get(ctx context.Context, path string, v any) error {
	return getJSON(ctx, d.client, "http://docker"+path, v)
}

// statusError is a request the API refused.
type statusError struct {
	path, status, message string
	code                  int
}

func (e *statusError) Error() string {
	return fmt.Sprintf("GET %s: %s: %s", e.path, e.status, e.message)
}

// apiError describes a refused request by its status and the API's
// message (the Engine API's JSON message, or the start of the body), which
// never carries a container's environment.
func apiError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	var m struct{ Message string }
	msg := strings.TrimSpace(string(body))
	if json.Unmarshal(body, &m) == nil && m.Message != "" {
		msg = m.Message
	}
	return &statusError{path: resp.Request.URL.Path, status: resp.Status, message: msg, code: resp.StatusCode}
}

// health logs a source's failures once per outage: the first error, then
// nothing until the source answers again, which is logged too.
type health struct {
	log    *zap.Logger
	what   string
	fields []zap.Field

	mu   sync.Mutex
	down bool
}

func (h *health) failed(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.down {
		return
	}
	h.down = true
	h.log.Warn(h.what+" unavailable; workloads known so far are kept, new ones are unknown until it answers",
		append([]zap.Field{zap.Error(err)}, h.fields...)...)
}

func (h *health) ok() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.down {
		h.down = false
		h.log.Info(h.what+" available again", h.fields...)
	}
}
