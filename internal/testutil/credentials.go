package testutil

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// The platforms' container credential endpoints, as a task or pod reaches
// them, and what the stand-ins below serve there.
const (
	// ECSTaskRoleAddr is the ECS agent's credential endpoint, which
	// AWS_CONTAINER_CREDENTIALS_RELATIVE_URI is a path of.
	ECSTaskRoleAddr = "169.254.170.2:80"
	// PodIdentityAddr is the EKS Pod Identity agent, which
	// AWS_CONTAINER_CREDENTIALS_FULL_URI names.
	PodIdentityAddr = "169.254.170.23:80"
	// PodIdentityPath is the agent's credential path.
	PodIdentityPath = "/v1/credentials"
)

// CredentialEndpoint is a stand-in for a platform's container credential
// endpoint, which cannot run here: the ECS agent's task role endpoint or
// the EKS Pod Identity agent. It answers GET on its path in their
// documented JSON shape (the ECS agent's with RoleArn, the Pod Identity
// agent's with AccountId), each time with a new access key that expires
// when the test says, and it can be made to answer garbage or to go down
// (its listener closed: connections refused).
type CredentialEndpoint struct {
	// URL is what a container asks: http://ADDR/PATH.
	URL string
	// RoleARN is the role it answers for.
	RoleARN string

	ns    *Netns
	addr  string
	token string // the Authorization header a request must carry, if any
	srv   *http.Server

	mu        sync.Mutex
	expiresIn time.Duration
	garbage   bool
	issued    []string
}

// StartCredentialEndpoint serves the stand-in in ns at addr (added to ns's
// loopback interface) and path. With token set, a request must carry it
// as its Authorization header, as the Pod Identity agent requires.
func StartCredentialEndpoint(t testing.TB, ns *Netns, addr, path, token string) *CredentialEndpoint {
	t.Helper()
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	ns.Run(t, "ip", "addr", "add", host+"/32", "dev", "lo")
	c := &CredentialEndpoint{URL: "http://" + host + path, RoleARN: "arn:aws:iam::111122223333:role/team/task-role",
		ns: ns, addr: addr, token: token, expiresIn: 6 * time.Hour}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+path, c.serve)
	c.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	c.Up(t)
	t.Cleanup(func() { c.srv.Close() })
	return c
}

func (c *CredentialEndpoint) serve(w http.ResponseWriter, r *http.Request) {
	if c.token != "" && r.Header.Get("Authorization") != c.token {
		http.Error(w, `{"code":"AccessDeniedException","message":"invalid token"}`, http.StatusUnauthorized)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	if c.garbage {
		fmt.Fprint(w, "<html>503 upstream connect error</html>")
		return
	}
	key := fmt.Sprintf("ASIASTANDIN%04d", len(c.issued)+1)
	c.issued = append(c.issued, key)
	answer := map[string]string{"AccessKeyId": key, "SecretAccessKey": "stand-in-secret-" + key, "Token": "stand-in-token-" + key,
		"Expiration": time.Now().Add(c.expiresIn).UTC().Format(time.RFC3339)}
	if c.token == "" {
		answer["RoleArn"] = c.RoleARN
	} else {
		answer["AccountId"] = "111122223333"
	}
	_ = json.NewEncoder(w).Encode(answer)
}

// Expire makes the credentials it gives from now on expire after d.
func (c *CredentialEndpoint) Expire(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.expiresIn = d
}

// Garbage makes it answer 200 with a body that is no credentials, or not.
func (c *CredentialEndpoint) Garbage(on bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.garbage = on
}

// Issued are the access keys it gave, in order.
func (c *CredentialEndpoint) Issued() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.issued...)
}

// Down closes its listener: connections to it are refused.
func (c *CredentialEndpoint) Down() { c.srv.Close() }

// Up (re)opens its listener.
func (c *CredentialEndpoint) Up(t testing.TB) {
	t.Helper()
	var ln net.Listener
	var err error
	c.ns.Do(t, func() { ln, err = net.Listen("tcp", c.addr) })
	if err != nil {
		t.Fatalf("credential endpoint stand-in at %s in %s: %v", c.addr, c.ns, err)
	}
	c.srv = &http.Server{Handler: c.srv.Handler, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = c.srv.Serve(ln) }()
}

// StartSTS starts moto's server, a mock of AWS STS (among others) from the
// Python package moto, in ns on 127.0.0.1, and returns its URL: what
// AWS_ENDPOINT_URL_STS points a client at. Its AssumeRoleWithWebIdentity
// answers any role with new credentials for an hour, without checking the
// token.
func StartSTS(t testing.TB, ns *Netns) string {
	t.Helper()
	bin, err := exec.LookPath("moto_server")
	if err != nil {
		SkipOutsideCI(t, "moto_server is missing (the Python package moto, on this kind of machine)")
	}
	const addr = "127.0.0.1:5353"
	logFile := filepath.Join(t.TempDir(), "moto.log")
	// ip netns exec executes moto itself: stopping it stops moto.
	startProcess(t, "moto_server", logFile, "ip", "netns", "exec", ns.Name, bin, "-H", "127.0.0.1", "-p", "5353")
	deadline := time.Now().Add(30 * time.Second)
	for ns.TryDial(t, addr) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("moto_server did not listen on %s in 30s\n%s", addr, tail(logFile))
		}
		time.Sleep(100 * time.Millisecond)
	}
	return "http://" + addr
}
