package testutil

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"testing"
)

// The ECS agent's task credential endpoint as containers in bridge mode
// reach it, and what the stand-in answers there.
const (
	ECSCredentialsAddr  = "169.254.170.2:80"
	ECSCredentialsPath  = "/v2/credentials/6f1c9d2e-task-role"
	ECSStandInAccessKey = "ASIAECSSTANDIN"
)

// StartECSAgentStandIn wires node the way ecs-init does for bridge-mode
// tasks and answers there. It is a stand-in for the ECS agent, which cannot
// run here: it serves only the credential path, in the agent's documented
// JSON shape, on 127.0.0.1:51679. The wiring is ecs-init's own: a nat
// PREROUTING DNAT of 169.254.170.2:80 to 127.0.0.1:51679, the OUTPUT
// REDIRECT for the host, and route_localnet on docker0 (without which the
// kernel drops packets routed to 127.0.0.1 from another interface).
func StartECSAgentStandIn(t testing.TB, node *Netns) {
	t.Helper()
	node.Run(t, "sysctl", "-qw", "net.ipv4.conf.docker0.route_localnet=1")
	node.Run(t, "iptables-nft", "-t", "nat", "-A", "PREROUTING", "-d", "169.254.170.2/32", "-p", "tcp", "-m", "tcp",
		"--dport", "80", "-j", "DNAT", "--to-destination", "127.0.0.1:51679")
	node.Run(t, "iptables-nft", "-t", "nat", "-A", "OUTPUT", "-d", "169.254.170.2/32", "-p", "tcp", "-m", "tcp",
		"--dport", "80", "-j", "REDIRECT", "--to-ports", "51679")
	var ln net.Listener
	var err error
	node.Do(t, func() { ln, err = net.Listen("tcp", "127.0.0.1:51679") })
	if err != nil {
		t.Fatalf("ECS agent stand-in: %v", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+ECSCredentialsPath, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"RoleArn":"arn:aws:iam::111122223333:role/task-role","AccessKeyId":%q,`+
			`"SecretAccessKey":"stand-in-secret","Token":"stand-in-token","Expiration":"2030-01-01T00:00:00Z"}`, ECSStandInAccessKey)
	})
	srv := &http.Server{Handler: mux}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("ECS agent stand-in: %v", err)
		}
	})
}
