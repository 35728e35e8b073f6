package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/doctor"
	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// startWorkloadRoleSidecar runs the imds-proxy-workload-role build as the
// task's sidecar with --credentials=workload and env, its upstream IMDS.
func startWorkloadRoleSidecar(t *testing.T, e *testutil.EC2, env []string, args ...string) *testutil.Process {
	t.Helper()
	argv := append([]string{"sidecar", "--listen", "127.0.0.1:8169", "--metrics-listen", "127.0.0.1:9169", "--iptables-backend", "nft",
		"--upstream", "http://169.254.169.254", "--credentials=workload"}, args...)
	// A proxy in the environment, where nothing listens: the sidecar must
	// ask its upstream and the credential source directly.
	env = append([]string{"HTTP_PROXY=http://127.0.0.1:1", "http_proxy=http://127.0.0.1:1"}, env...)
	return testutil.StartProxy(t, e.Task, bins.ProxyWorkloadRole, argv, testutil.WithEnv(env...))
}

// getV2 GETs path from IMDS in ns with a token, as an IMDSv2 client does,
// and returns the status and body.
func getV2(t *testing.T, ns *testutil.Netns, path string) (int, string) {
	t.Helper()
	status, token := ns.Send(t, http.MethodPut, imdsAddr, imdsapi.TokenPath, http.Header{imdsapi.TokenTTLHeader: {"60"}})
	if status != http.StatusOK {
		t.Fatalf("token in %s: %d %s", ns, status, token)
	}
	return ns.Get(t, imdsAddr, path, http.Header{imdsapi.TokenHeader: {token}})
}

// imdsAddr is IMDS's address, which a redirect may send to a proxy.
const imdsAddr = imdsapi.AddrV4 + ":80"

// instanceRoleKey is the access key of the instance's role, asked of IMDS
// from the node: what must never reach a workload with a role of its own.
func instanceRoleKey(t *testing.T, e *testutil.EC2) string {
	t.Helper()
	_, role := getV2(t, e.Node, "/latest/meta-data/iam/security-credentials/")
	_, body := getV2(t, e.Node, "/latest/meta-data/iam/security-credentials/"+role)
	var creds struct{ AccessKeyId string }
	if err := json.Unmarshal([]byte(body), &creds); err != nil || creds.AccessKeyId == "" {
		t.Fatalf("the instance role's credentials from IMDS: %q: %v", body, err)
	}
	return creds.AccessKeyId
}

// awsConfigureList runs `aws configure list` (the AWS CLI v1 on this
// machine) in ns with no AWS settings of its own, and returns the access
// key's masked value and where the CLI says it came from.
func awsConfigureList(t *testing.T, ns *testutil.Netns) (masked, kind string) {
	t.Helper()
	if _, err := exec.LookPath("aws"); err != nil {
		testutil.SkipOutsideCI(t, "the AWS CLI is missing (it comes with this kind of machine's Python)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns.Name, "aws", "configure", "list")
	cmd.Env = append(clientEnv(), "HOME="+os.Getenv("HOME")) // pyenv finds its Python through HOME
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("aws configure list: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "access_key" {
			return f[1], f[2]
		}
	}
	t.Fatalf("aws configure list printed no access_key line:\n%s", out)
	return "", ""
}

// TestWorkloadRoleToIMDSOnlyClients: a sidecar with --credentials=workload
// serves each platform's own role on the IMDS role path. The AWS SDK for Go
// v2, botocore and the AWS SDK for JavaScript v3, in the task with no AWS
// settings of their own (as IMDS-only clients are), get the workload role's
// credentials; `aws configure list` names them as the instance metadata's
// (iam-role); and the instance role's credentials reach none of them. The
// sources are processes in the task's namespace, at the platform's
// addresses: an ECS agent stand-in (169.254.170.2), an EKS Pod Identity
// agent stand-in (169.254.170.23, with its token file), and, for IRSA, the
// moto mock of STS (AWS_ENDPOINT_URL_STS) with a token file.
func TestWorkloadRoleToIMDSOnlyClients(t *testing.T) {
	clients := interopClients(t)
	for _, c := range []struct {
		name  string
		setup func(t *testing.T, e *testutil.EC2) (env []string, args []string, keyOf func() string)
	}{
		{"ECS task role", func(t *testing.T, e *testutil.EC2) ([]string, []string, func() string) {
			ecs := testutil.StartCredentialEndpoint(t, e.Task, testutil.ECSTaskRoleAddr, "/v2/credentials/6f1c9d2e", "")
			return []string{"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/6f1c9d2e"}, []string{"--workload-role-arn", ecs.RoleARN},
				func() string { return last(ecs.Issued()) }
		}},
		{"EKS Pod Identity", func(t *testing.T, e *testutil.EC2) ([]string, []string, func() string) {
			tokenFile := filepath.Join(t.TempDir(), "eks-pod-identity-token")
			if err := os.WriteFile(tokenFile, []byte("pod-identity-jwt"), 0o644); err != nil {
				t.Fatal(err)
			}
			agent := testutil.StartCredentialEndpoint(t, e.Task, testutil.PodIdentityAddr, testutil.PodIdentityPath, "pod-identity-jwt")
			return []string{"AWS_CONTAINER_CREDENTIALS_FULL_URI=" + agent.URL, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=" + tokenFile}, nil,
				func() string { return last(agent.Issued()) }
		}},
		{"IRSA (STS: moto)", func(t *testing.T, e *testutil.EC2) ([]string, []string, func() string) {
			sts := testutil.StartSTS(t, e.Task)
			tokenFile := filepath.Join(t.TempDir(), "token")
			if err := os.WriteFile(tokenFile, []byte("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6dGVhbS1hOndlYiJ9.c2ln"), 0o644); err != nil {
				t.Fatal(err)
			}
			return []string{"AWS_ROLE_ARN=arn:aws:iam::111122223333:role/irsa-web", "AWS_WEB_IDENTITY_TOKEN_FILE=" + tokenFile,
				"AWS_REGION=us-east-1", "AWS_ENDPOINT_URL_STS=" + sts}, nil, nil
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := testutil.NewEC2(t, testutil.HopLimit(2))
			instanceKey := instanceRoleKey(t, e)
			env, args, keyOf := c.setup(t, e)
			sidecar := startWorkloadRoleSidecar(t, e, env, args...)

			status, listing := getV2(t, e.Task, "/latest/meta-data/iam/security-credentials/")
			if status != 200 || listing == "" || strings.Contains(listing, "\n") {
				t.Fatalf("security-credentials/: %d %q, want one role name\n%s", status, listing, sidecar.Logs.String())
			}
			status, body := getV2(t, e.Task, "/latest/meta-data/iam/security-credentials/"+listing)
			var served struct{ Code, AccessKeyId, Expiration string }
			if err := json.Unmarshal([]byte(body), &served); err != nil || status != 200 || served.Code != "Success" {
				t.Fatalf("security-credentials/%s: %d %s (%v)", listing, status, body, err)
			}
			if keyOf != nil && served.AccessKeyId != keyOf() {
				t.Errorf("served %s, want the source's latest %s", served.AccessKeyId, keyOf())
			}
			if served.AccessKeyId == instanceKey {
				t.Fatalf("the sidecar served the instance role's key %s", instanceKey)
			}

			got := map[string]string{}
			r, err := goSDK(t, e.Task)
			if err != nil {
				t.Fatalf("Go SDK v2: %v\n%s", err, sidecar.Logs.String())
			}
			got["Go SDK v2"] = r.AccessKeyID
			if key, _, ok, err := botocore(t, e.Task); err != nil {
				t.Errorf("botocore: %v", err)
			} else if ok {
				got["botocore"] = key
			} else {
				testutil.SkipOutsideCI(t, "botocore is missing (it comes with this kind of machine's Python)")
			}
			js, err := runClient(t, e.Task, clients["JavaScript SDK v3"])
			if err != nil || !js.OK {
				t.Errorf("JavaScript SDK v3: %v %+v", err, js)
			}
			got["JavaScript SDK v3"] = js.AccessKeyID
			for client, key := range got {
				if key != served.AccessKeyId {
					t.Errorf("%s got access key %q, want the workload role's %s (the instance role's is %s)", client, key, served.AccessKeyId, instanceKey)
				}
			}
			masked, kind := awsConfigureList(t, e.Task)
			if kind != "iam-role" || !strings.HasSuffix(masked, served.AccessKeyId[len(served.AccessKeyId)-4:]) {
				t.Errorf("aws configure list: access_key %s from %s, want the workload role's (…%s) from iam-role",
					masked, kind, served.AccessKeyId[len(served.AccessKeyId)-4:])
			}
			if strings.Contains(sidecar.Logs.String(), served.AccessKeyId) || strings.Contains(sidecar.Logs.String(), "secret") {
				t.Errorf("the sidecar's log carries the credentials:\n%s", sidecar.Logs.String())
			}
			t.Logf("%s: %v got %s; the instance role's %s reached none", c.name, keysOf(got), served.AccessKeyId, instanceKey)
		})
	}
}

func last(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[len(s)-1]
}

func keysOf(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestWorkloadRoleSourceFailures: with the ECS agent stand-in as the
// source, the sidecar renews credentials in the background 20 minutes
// before they expire; while the source answers garbage or is down, it
// serves the credentials it had while they are good for 5 more minutes,
// then answers 404 on the role path (and only there), logging each outage
// once and its end once; the metrics and doctor say so; and the instance's
// role is never served.
func TestWorkloadRoleSourceFailures(t *testing.T) {
	e := testutil.NewEC2(t, testutil.HopLimit(2))
	instanceKey := instanceRoleKey(t, e)
	ecs := testutil.StartCredentialEndpoint(t, e.Task, testutil.ECSTaskRoleAddr, "/v2/credentials/6f1c9d2e", "")
	// The sidecar renews credentials 20 minutes before they expire
	// (roleRefreshBefore in proxy/role.go): these are due 3 s after they come.
	const dueSoon = 20*time.Minute + 3*time.Second
	ecs.Expire(dueSoon)
	sidecar := startWorkloadRoleSidecar(t, e, []string{"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/6f1c9d2e"},
		"--workload-role-arn", ecs.RoleARN)
	const rolePath = "/latest/meta-data/iam/security-credentials/task-role"
	credentials := func(want int) string {
		t.Helper()
		status, body := getV2(t, e.Task, rolePath)
		var c struct{ AccessKeyId, Expiration string }
		if status != want {
			t.Fatalf("GET %s: %d, want %d\n%s\n%s", rolePath, status, want, body, sidecar.Logs.String())
		}
		if status == 200 {
			if err := json.Unmarshal([]byte(body), &c); err != nil {
				t.Fatal(err)
			}
			if c.AccessKeyId == instanceKey {
				t.Fatalf("the instance role's key %s was served", instanceKey)
			}
		}
		return c.AccessKeyId
	}
	// served waits up to 5 s for the sidecar to serve the source's latest
	// key, other than old: a background renewal's.
	served := func(what, old string) string {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			if key := credentials(200); key != old && key == last(ecs.Issued()) {
				return key
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the sidecar serves %s, not the source's latest %s\n%s", what, credentials(200), last(ecs.Issued()), sidecar.Logs.String())
			}
		}
	}
	metric := func(name string) float64 {
		t.Helper()
		_, text := e.Task.Get(t, "127.0.0.1:9169", "/metrics", nil)
		for _, line := range strings.Split(text, "\n") {
			if strings.HasPrefix(line, name+"{") {
				var v float64
				_, _ = fmt.Sscan(line[strings.LastIndex(line, " ")+1:], &v)
				return v
			}
		}
		t.Fatalf("no %s in /metrics", name)
		return 0
	}
	pause := func(d time.Duration) { time.Sleep(d) }

	// Due credentials are served, and renewed in the background.
	first := credentials(200)
	pause(3500 * time.Millisecond)
	served("credentials due, renewed", first)
	// Garbage, while the last credentials are good for 20 minutes: served.
	ecs.Garbage(true)
	pause(3500 * time.Millisecond)
	good := credentials(200)
	if good != last(ecs.Issued()) {
		t.Errorf("while the source answers garbage: served %s, want the last good %s", good, last(ecs.Issued()))
	}
	// The background renewal that request started fails (after the SDK's
	// own retries) before the source is mended.
	for deadline := time.Now().Add(10 * time.Second); metric("imds_proxy_workload_role_failures_total") < 1; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the renewal from a source answering garbage was not counted as failed\n%s", sidecar.Logs.String())
		}
	}
	// Credentials good for 4 minutes only: once the source fails, 404.
	ecs.Garbage(false)
	ecs.Expire(4 * time.Minute)
	pause(2100 * time.Millisecond) // past the wait before a failing source is asked again
	served("the 4-minute credentials", good)
	ecs.Garbage(true)
	credentials(404)
	ecs.Down()
	pause(2100 * time.Millisecond)
	credentials(404)
	if status, _ := getV2(t, e.Task, "/latest/meta-data/iam/security-credentials/"); status != 404 {
		t.Errorf("the listing while the source is down: %d, want 404 as where no role is attached", status)
	}
	if status, _ := getV2(t, e.Task, "/latest/meta-data/instance-id"); status != 200 {
		t.Errorf("the rest of IMDS while the role's source is down: %d, want 200", status)
	}
	if r, code := runDoctor(t, e.Task); code != doctor.ExitWorkloadRole || r.Role == nil || r.Role.Status != 404 {
		t.Errorf("doctor while the source is down: exit %d, %+v: %s; want exit %d naming the workload role's 404", code, r.Role, r.Diagnosis, doctor.ExitWorkloadRole)
	}
	if metric("imds_proxy_workload_role_credentials_valid") != 0 || metric("imds_proxy_workload_role_failures_total") < 3 {
		t.Errorf("metrics while down: valid %v, failures %v; want 0 and at least 3",
			metric("imds_proxy_workload_role_credentials_valid"), metric("imds_proxy_workload_role_failures_total"))
	}
	// Back.
	ecs.Expire(6 * time.Hour)
	ecs.Garbage(false)
	ecs.Up(t)
	pause(2100 * time.Millisecond)
	if got := credentials(200); got != last(ecs.Issued()) {
		t.Errorf("after the source came back: served %s, want its %s", got, last(ecs.Issued()))
	}
	if metric("imds_proxy_workload_role_credentials_valid") != 1 {
		t.Error("imds_proxy_workload_role_credentials_valid is not 1 once the source is back")
	}
	if r, code := runDoctor(t, e.Task); code != doctor.ExitHealthy || r.Role == nil || r.Role.Name != "task-role" {
		t.Errorf("doctor once the source is back: exit %d, %+v: %s; want healthy, naming the role task-role", code, r.Role, r.Diagnosis)
	}
	logs := sidecar.Logs.String()
	// Two outages: the garbage while the credentials were good, and the
	// garbage then down with the requests refused.
	if n, m := testutil.CountLines(logs, "cannot be had"), testutil.CountLines(logs, "from its source again"); n != 2 || m != 2 {
		t.Errorf("the two outages were logged %d times and their ends %d times, want once each:\n%s", n, m, logs)
	}
	if strings.Contains(logs, "stand-in-secret") || strings.Contains(logs, "ASIASTANDIN") {
		t.Errorf("the sidecar's log carries credentials:\n%s", logs)
	}
}
