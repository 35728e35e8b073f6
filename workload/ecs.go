package workload

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/imds-proxy/imds-proxy/internal/attribution"
)

// ECSIntrospection knows the ECS tasks of this container instance from the
// ECS agent's introspection API (http://localhost:51678 on the instance):
// each task's ARN and task definition, and the Docker ID and name of each
// of its containers. The labels a task definition sets (dockerLabels, where
// imds-proxy.io/v1 goes) and whether the task has a role are the Docker
// source's to tell, where there is one.
type ECSIntrospection struct {
	base     string
	docker   *Docker
	log      *zap.Logger
	client   *http.Client
	interval time.Duration

	mu         sync.RWMutex
	cluster    string
	containers map[string]Workload

	health health
}

// NewECSIntrospection returns a source for the ECS agent whose
// introspection API is at baseURL. docker, if not nil, is the Docker source
// of the same engine, whose entry for a container gives its Settings,
// OwnIdentity and Image; the caller runs it. It holds nothing until Run.
func NewECSIntrospection(baseURL string, docker *Docker, log *zap.Logger) *ECSIntrospection {
	if log == nil {
		log = zap.NewNop()
	}
	return &ECSIntrospection{
		base:       strings.TrimSuffix(baseURL, "/"),
		docker:     docker,
		log:        log,
		client:     &http.Client{Timeout: dockerRequestTimeout},
		interval:   defaultECSPollInterval,
		containers: map[string]Workload{},
		health:     health{log: log, what: "ECS agent introspection API", fields: []zap.Field{zap.String("url", baseURL)}},
	}
}

// Lookup returns the workload of the container whose Docker ID is c.ID,
// from what Run has gathered. Callers must not modify its Settings.
func (e *ECSIntrospection) Lookup(c attribution.Container) (Workload, bool) {
	if c.ID == "" {
		return Workload{}, false
	}
	e.mu.RLock()
	w, ok := e.containers[c.ID]
	e.mu.RUnlock()
	if !ok {
		return Workload{}, false
	}
	if e.docker != nil {
		if d, ok := e.docker.Lookup(c); ok {
			w.Settings, w.OwnIdentity = d.Settings, d.OwnIdentity
			if w.Image == "" {
				w.Image = d.Image
			}
		}
	}
	return w, true
}

// Run asks the agent for its tasks every few seconds until ctx ends. When
// the agent does not answer, what it said last is kept; that is logged
// once, and again once it answers.
func (e *ECSIntrospection) Run(ctx context.Context) {
	defer e.client.CloseIdleConnections()
	pollEvery(ctx, e.interval, e.poll, &e.health)
}

// pollEvery calls poll every interval until ctx ends, telling h how each
// call went.
func pollEvery(ctx context.Context, interval time.Duration, poll func(context.Context) error, h *health) {
	for {
		if err := poll(ctx); err != nil && ctx.Err() == nil {
			h.failed(err)
		} else if err == nil {
			h.ok()
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}

// The agent's introspection answers (amazon-ecs-agent, agent/handlers/v1).
type (
	introspectionMetadata struct {
		Cluster string
	}
	introspectionTasks struct {
		Tasks []struct {
			Arn         string
			Family      string
			Version     string
			KnownStatus string
			Containers  []struct {
				DockerID   string `json:"DockerId"`
				DockerName string
				Name       string
			}
		}
	}
)

func (e *ECSIntrospection) poll(ctx context.Context) error {
	e.mu.RLock()
	cluster := e.cluster
	e.mu.RUnlock()
	if cluster == "" {
		var m introspectionMetadata
		if err := getJSON(ctx, e.client, e.base+"/v1/metadata", &m); err != nil {
			return err
		}
		cluster = clusterName(m.Cluster)
	}
	var tasks introspectionTasks
	if err := getJSON(ctx, e.client, e.base+"/v1/tasks", &tasks); err != nil {
		return err
	}
	containers := map[string]Workload{}
	for _, t := range tasks.Tasks {
		if t.KnownStatus == "STOPPED" {
			continue // its containers are gone
		}
		for _, c := range t.Containers {
			if c.DockerID == "" {
				continue // not created yet
			}
			containers[c.DockerID] = Workload{
				Platform:  "ecs",
				Namespace: cluster,
				Name:      taskDefinition(t.Family, t.Version),
				Pod:       t.Arn,
				Container: c.Name,
			}
		}
	}
	e.mu.Lock()
	e.cluster, e.containers = cluster, containers
	e.mu.Unlock()
	return nil
}

// ECSTaskMetadata knows the containers of the task it runs in from the
// task metadata endpoint v4 (${ECS_CONTAINER_METADATA_URI_V4}/task): what
// an imds-proxy sidecar in an awsvpc task uses, with no Docker socket. Its
// Settings are each container's imds-proxy.io/* labels (the task
// definition's dockerLabels). The endpoint does not tell whether the task
// has a role, so OwnIdentity stays "".
type ECSTaskMetadata struct {
	uri      string
	log      *zap.Logger
	client   *http.Client
	interval time.Duration

	mu         sync.RWMutex
	containers map[string]Workload
	task       Workload            // the task itself
	addrs      map[netip.Addr]bool // the task ENI's addresses

	health health
}

// NewECSTaskMetadata returns a source for the task metadata endpoint v4 at
// uri (the value of ECS_CONTAINER_METADATA_URI_V4). It holds nothing until
// Run.
func NewECSTaskMetadata(uri string, log *zap.Logger) *ECSTaskMetadata {
	if log == nil {
		log = zap.NewNop()
	}
	return &ECSTaskMetadata{
		uri:        strings.TrimSuffix(uri, "/"),
		log:        log,
		client:     &http.Client{Timeout: dockerRequestTimeout},
		interval:   defaultECSPollInterval,
		containers: map[string]Workload{},
		health:     health{log: log, what: "ECS task metadata endpoint", fields: []zap.Field{zap.String("url", uri)}},
	}
}

// Lookup returns the workload of the task's container whose Docker ID is
// c.ID, from what Run has gathered. Callers must not modify its Settings.
func (m *ECSTaskMetadata) Lookup(c attribution.Container) (Workload, bool) {
	if c.ID == "" {
		return Workload{}, false
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	w, ok := m.containers[c.ID]
	return w, ok
}

// Run asks the endpoint for the task every few seconds until ctx ends,
// keeping what it said last when it does not answer (logged once).
func (m *ECSTaskMetadata) Run(ctx context.Context) {
	defer m.client.CloseIdleConnections()
	pollEvery(ctx, m.interval, m.poll, &m.health)
}

// taskMetadataV4 is the endpoint's task answer, the fields read here.
type taskMetadataV4 struct {
	Cluster    string
	TaskARN    string
	Family     string
	Revision   string
	Containers []struct {
		DockerID string `json:"DockerId"`
		Name     string
		Image    string
		Labels   map[string]string
		Networks []struct{ IPv4Addresses, IPv6Addresses []string }
	}
}

func (m *ECSTaskMetadata) poll(ctx context.Context) error {
	var task taskMetadataV4
	if err := getJSON(ctx, m.client, m.uri+"/task", &task); err != nil {
		return err
	}
	containers := map[string]Workload{}
	addrs := map[netip.Addr]bool{}
	for _, c := range task.Containers {
		for _, n := range c.Networks {
			for _, text := range append(n.IPv4Addresses, n.IPv6Addresses...) {
				if addr, err := netip.ParseAddr(text); err == nil {
					addrs[addr] = true
				}
			}
		}
		if c.DockerID == "" {
			continue
		}
		containers[c.DockerID] = Workload{
			Platform:  "ecs",
			Namespace: clusterName(task.Cluster),
			Name:      taskDefinition(task.Family, task.Revision),
			Pod:       task.TaskARN,
			Container: c.Name,
			Image:     c.Image,
			Settings:  settings(c.Labels),
		}
	}
	m.mu.Lock()
	m.containers, m.addrs = containers, addrs
	m.task = Workload{Platform: "ecs", Namespace: clusterName(task.Cluster), Name: taskDefinition(task.Family, task.Revision), Pod: task.TaskARN}
	m.mu.Unlock()
	return nil
}

// LookupAddr returns the task's workload, without a container, for one of
// its ENI's addresses: where an awsvpc task's sidecar cannot see which of
// its containers called (they share the ENI, and not the sidecar's PID
// namespace unless the task's pidMode says so), it still names the task.
func (m *ECSTaskMetadata) LookupAddr(addr netip.Addr) (Workload, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.task, m.addrs[addr]
}

// getJSON decodes the JSON answer of a GET; a refused request is a
// *statusError.
func getJSON(ctx context.Context, client *http.Client, url string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return apiError(resp)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxMetadataResponseSize)).Decode(v); err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	return nil
}

var (
	_ Source = (*Docker)(nil)
	_ Source = (*ECSIntrospection)(nil)
	_ Source = (*ECSTaskMetadata)(nil)
)
