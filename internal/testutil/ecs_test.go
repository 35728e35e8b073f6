package testutil

import (
	"encoding/json"
	"net/http"
	"reflect"
	"slices"
	"testing"
)

// getKeys GETs url and returns the decoded JSON and its top-level keys.
func getKeys(t *testing.T, url string) (map[string]any, []string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	var v map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for k := range v {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return v, keys
}

func objectKeys(v any) []string {
	var keys []string
	for k := range v.(map[string]any) {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// TestECSIntrospectionStandIn: the stand-in answers in the agent's key
// spellings (agent/handlers/v1/response.go) and follows SetTasks and
// SetDown.
func TestECSIntrospectionStandIn(t *testing.T) {
	task := ECSTask{Arn: "arn:aws:ecs:us-east-1:111122223333:task/prod/0123", Family: "web", Revision: "7",
		Containers: []ECSContainer{{DockerID: "abc", DockerName: "ecs-web-7-app-1", Name: "app"}}}
	s := StartECSIntrospectionStandIn(t, nil, "127.0.0.1:0", "prod", task)
	if v, keys := getKeys(t, s.URL+"/v1/metadata"); !slices.Equal(keys, []string{"Cluster", "ContainerInstanceArn", "Version"}) || v["Cluster"] != "prod" {
		t.Errorf("metadata %v", v)
	}
	v, _ := getKeys(t, s.URL+"/v1/tasks")
	tasks := v["Tasks"].([]any)
	if len(tasks) != 1 {
		t.Fatalf("tasks %v", v)
	}
	if keys := objectKeys(tasks[0]); !slices.Equal(keys, []string{"Arn", "Containers", "DesiredStatus", "Family", "KnownStatus", "Version"}) {
		t.Errorf("task keys %v", keys)
	}
	c := tasks[0].(map[string]any)["Containers"].([]any)[0]
	if want := map[string]any{"DockerId": "abc", "DockerName": "ecs-web-7-app-1", "Name": "app"}; !reflect.DeepEqual(c, want) {
		t.Errorf("container %v, want %v", c, want)
	}
	s.SetTasks()
	if v, _ := getKeys(t, s.URL+"/v1/tasks"); len(v["Tasks"].([]any)) != 0 {
		t.Errorf("after SetTasks(): %v", v)
	}
	s.SetDown(true)
	resp, err := http.Get(s.URL + "/v1/tasks")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("down: %s", resp.Status)
	}
}

// TestECSTaskMetadataStandIn: the stand-in answers {URL}/task in the task
// metadata endpoint v4's key spellings, with the ECS agent's labels beside
// the task definition's.
func TestECSTaskMetadataStandIn(t *testing.T) {
	task := ECSTask{Arn: "arn:aws:ecs:us-east-1:111122223333:task/prod/0123", Family: "api", Revision: "12",
		Containers: []ECSContainer{{DockerID: "abc", Name: "app", Image: "api:1", Labels: map[string]string{"imds-proxy.io/v1": "block"}}}}
	s := StartECSTaskMetadataStandIn(t, nil, "127.0.0.1:0", "prod", task)
	v, keys := getKeys(t, s.URL+"/task")
	for _, k := range []string{"Cluster", "TaskARN", "Family", "Revision", "KnownStatus", "Containers"} {
		if !slices.Contains(keys, k) {
			t.Errorf("no %s in %v", k, keys)
		}
	}
	if v["TaskARN"] != task.Arn || v["Revision"] != "12" || v["Cluster"] != "prod" {
		t.Errorf("task %v", v)
	}
	c := v["Containers"].([]any)[0].(map[string]any)
	labels := c["Labels"].(map[string]any)
	if c["DockerId"] != "abc" || c["Name"] != "app" || c["Image"] != "api:1" || labels["imds-proxy.io/v1"] != "block" ||
		labels["com.amazonaws.ecs.task-arn"] != task.Arn || labels["com.amazonaws.ecs.task-definition-version"] != "12" {
		t.Errorf("container %v", c)
	}
}
