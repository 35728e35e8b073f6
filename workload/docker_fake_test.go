package workload

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeEngine answers the few Engine API requests the Docker source makes,
// on a unix socket, refusing every API version outside [min, max] as
// Docker does. It is for what a real engine here cannot show: a newer
// engine's version range, and an engine that errs.
type fakeEngine struct {
	socket   string
	min, max string

	mu         sync.Mutex
	containers map[string]map[string]any // ID → inspect answer
	listStatus int                       // 200 unless set
	paths      []string
}

func startFakeEngine(t *testing.T, min, max string) *fakeEngine {
	t.Helper()
	dir, err := os.MkdirTemp("", "imdsp-fake-docker-") // t.TempDir() can exceed a socket path's 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &fakeEngine{socket: filepath.Join(dir, "docker.sock"), min: min, max: max,
		containers: map[string]map[string]any{}, listStatus: http.StatusOK}
	ln, err := net.Listen("unix", e.socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(e.serve)}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return e
}

func (e *fakeEngine) serve(w http.ResponseWriter, r *http.Request) {
	e.mu.Lock()
	e.paths = append(e.paths, r.URL.Path)
	e.mu.Unlock()
	if r.URL.Path == "/version" {
		json.NewEncoder(w).Encode(map[string]string{"ApiVersion": e.max, "MinAPIVersion": e.min, "Version": "fake"})
		return
	}
	version, rest, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v"), "/")
	if versionLess(version, e.min) || versionLess(e.max, version) {
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprintf(w, `{"message":"client version %s is too old. Minimum supported API version is %s"}`, version, e.min)
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	switch {
	case rest == "events":
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		e.mu.Unlock()
		<-r.Context().Done()
		e.mu.Lock()
	case rest == "containers/json":
		if e.listStatus != http.StatusOK {
			w.WriteHeader(e.listStatus)
			fmt.Fprint(w, `{"message":"the fake engine fails"}`)
			return
		}
		list := []map[string]string{}
		for id := range e.containers {
			list = append(list, map[string]string{"Id": id})
		}
		json.NewEncoder(w).Encode(list)
	case strings.HasPrefix(rest, "containers/") && strings.HasSuffix(rest, "/json"):
		c, ok := e.containers[strings.TrimSuffix(strings.TrimPrefix(rest, "containers/"), "/json")]
		if !ok {
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"message":"No such container"}`)
			return
		}
		json.NewEncoder(w).Encode(c)
	default:
		http.NotFound(w, r)
	}
}

// TestDockerNegotiatesTheAPIVersion: against an engine that refuses 1.41
// (Docker 29 accepts 1.44 and later), the source speaks the oldest version
// the engine accepts; against one whose newest is older, that.
func TestDockerNegotiatesTheAPIVersion(t *testing.T) {
	for _, c := range []struct{ min, max, want string }{
		{"1.44", "1.52", "1.44"},
		{"1.24", "1.49", "1.41"},
		{"1.12", "1.40", "1.40"},
	} {
		t.Run(c.want, func(t *testing.T) {
			e := startFakeEngine(t, c.min, c.max)
			e.containers[containerID("a")] = map[string]any{"Id": containerID("a"), "Name": "/web",
				"Config": map[string]any{"Image": "nginx:1", "Labels": map[string]string{V1Key: "warn"}}}
			log, logs := observed()
			src := NewDocker(e.socket, log)
			run(t, src)
			eventually(t, 5*time.Second, "the container is not found", func() bool { _, ok := lookup(src, containerID("a")); return ok })
			got, _ := lookup(src, containerID("a"))
			want := Workload{Platform: "docker", Name: "web", Container: "web", Image: "nginx:1", Settings: map[string]string{V1Key: "warn"}}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("%+v, want %+v", got, want)
			}
			e.mu.Lock()
			defer e.mu.Unlock()
			for _, p := range e.paths {
				if p != "/version" && !strings.HasPrefix(p, "/v"+c.want+"/") {
					t.Errorf("asked %s, want v%s", p, c.want)
				}
			}
			if logs.Len() != 0 {
				t.Errorf("logs: %v", logs.All())
			}
		})
	}
}

// TestDockerAPIError: an engine that refuses the list is logged once, with
// its message, however often the source retries; once it answers, the
// source knows its containers and says so.
func TestDockerAPIError(t *testing.T) {
	e := startFakeEngine(t, "1.24", "1.41")
	e.listStatus = http.StatusInternalServerError
	e.containers[containerID("a")] = map[string]any{"Id": containerID("a"), "Name": "/web",
		"Config": map[string]any{"Image": "nginx:1", "Env": []string{"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/secret-guid"}}}
	log, logs := observed()
	src := NewDocker(e.socket, log)
	src.retry = pollInterval
	run(t, src)
	time.Sleep(10 * pollInterval)
	entries := logs.FilterMessageSnippet("unavailable").All()
	if len(entries) != 1 {
		t.Fatalf("%d logs of the engine unavailable over 10 retries, want 1: %v", len(entries), logs.All())
	}
	if err := fmt.Sprint(entries[0].ContextMap()["error"]); !strings.Contains(err, "the fake engine fails") {
		t.Errorf("logged error %q, want the API's message", err)
	}
	if sock := entries[0].ContextMap()["socket"]; sock != e.socket {
		t.Errorf("logged socket %v, want %s", sock, e.socket)
	}
	e.mu.Lock()
	e.listStatus = http.StatusOK
	e.mu.Unlock()
	eventually(t, 5*time.Second, "the container is not found once the engine answers", func() bool { _, ok := lookup(src, containerID("a")); return ok })
	got, _ := lookup(src, containerID("a"))
	if got.OwnIdentity != IdentityTaskRole {
		t.Errorf("own identity %q, want %q", got.OwnIdentity, IdentityTaskRole)
	}
	if strings.Contains(fmt.Sprintf("%#v", got), "secret-guid") {
		t.Errorf("the workload holds the credentials URI: %#v", got)
	}
	eventually(t, time.Second, "the engine back is not logged", func() bool { return logs.FilterMessageSnippet("available again").Len() == 1 })
}

// TestDockerSocketAbsent: with no socket the source knows nothing, logs
// that once with the socket's path, and Run returns when its context ends.
func TestDockerSocketAbsent(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "docker.sock")
	log, logs := observed()
	src := NewDocker(socket, log)
	src.retry = pollInterval
	run(t, src)
	time.Sleep(10 * pollInterval)
	entries := logs.FilterMessageSnippet("unavailable").All()
	if len(entries) != 1 || logs.Len() != 1 {
		t.Fatalf("%d logs, want 1: %v", logs.Len(), logs.All())
	}
	if sock := entries[0].ContextMap()["socket"]; sock != socket {
		t.Errorf("logged socket %v, want %s", sock, socket)
	}
	if w, ok := lookup(src, containerID("a")); ok {
		t.Errorf("found %+v", w)
	}
}

// TestDockerWorkload: the ECS agent's labels make a container an ECS
// task's; other containers are Docker's, named by their name; only
// imds-proxy.io/* labels are Settings.
func TestDockerWorkload(t *testing.T) {
	labels := map[string]string{
		ecsLabelCluster: "arn:aws:ecs:us-east-1:111122223333:cluster/prod", ecsLabelTaskARN: "arn:aws:ecs:us-east-1:111122223333:task/prod/0123",
		ecsLabelFamily: "web", ecsLabelRevision: "7", ecsLabelContainerName: "app", V1Key: "block", "imds-proxy.io/other": "x", "team": "a",
	}
	got := dockerWorkload("ecs-web-7-app-e4f0", "nginx:1", labels, true)
	want := Workload{Platform: "ecs", Namespace: "prod", Name: "web:7", Pod: "arn:aws:ecs:us-east-1:111122223333:task/prod/0123",
		Container: "app", Image: "nginx:1", OwnIdentity: IdentityTaskRole, Settings: map[string]string{V1Key: "block", "imds-proxy.io/other": "x"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ECS: %+v, want %+v", got, want)
	}
	got = dockerWorkload("web", "nginx:1", map[string]string{"team": "a"}, false)
	want = Workload{Platform: "docker", Name: "web", Container: "web", Image: "nginx:1"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Docker: %+v, want %+v", got, want)
	}
}
