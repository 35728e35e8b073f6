package testutil

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
)

// EC2 is an EC2 instance in miniature, in namespaces the test owns:
//
//	task (10.200.1.2) --cveth0-- node (10.200.1.1, forwards) --imdslink-- imds (169.254.169.254)
//
// NewEC2On connects the task by another Wiring (a CNI's or Docker's).
// The node reaches IMDS from 169.254.0.1, its address on imdslink, the way
// an instance reaches it over its primary ENI.
//
// amazon-ec2-metadata-mock runs in imds on 169.254.169.254:80. Like real IMDS,
// its token responses leave with IP TTL = the hop limit while every other
// response keeps the normal TTL: a mangle rule in imds sets the TTL of the
// packets that carry the token TTL response header, retransmissions included.
type EC2 struct {
	Node, Task, IMDS *Netns
	AEMM             *AEMM
	Wiring           Wiring
}

// NodeAddr is the node's address towards IMDS, its primary address: what
// a chained sidecar names as its upstream.
const NodeAddr = "169.254.0.1"

// TokenResponseMarker is the response header only token responses carry.
const TokenResponseMarker = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"

// NewEC2 builds the topology with the given hop limit; tokensRequired runs
// AEMM with -I, as an instance with HttpTokens=required.
func NewEC2(t testing.TB, hopLimit int, tokensRequired bool) *EC2 {
	t.Helper()
	return NewEC2On(t, RoutedVeth, hopLimit, tokensRequired)
}

// NewEC2On builds the topology with the task connected by wiring.
func NewEC2On(t testing.TB, wiring Wiring, hopLimit int, tokensRequired bool) *EC2 {
	t.Helper()
	e := &EC2{Node: NewNetns(t), Task: NewNetns(t), IMDS: NewNetns(t), Wiring: wiring}
	Veth(t, e.Node, "imdslink", NodeAddr+"/16", e.IMDS, "eth0", "169.254.169.254/16")
	if wiring.wire != nil {
		wiring.wire(t, e.Node, e.Task)
	}
	e.IMDS.Run(t, "ip", "route", "add", "default", "via", "169.254.0.1")
	e.Node.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	e.IMDS.Run(t, "iptables-nft", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--sport", "80",
		"-m", "string", "--string", TokenResponseMarker, "--algo", "bm",
		"-j", "TTL", "--ttl-set", strconv.Itoa(hopLimit))
	e.IMDS.Run(t, "iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "80",
		"-m", "string", "--algo", "bm", "--string", "GET /",
		"-m", "string", "--algo", "bm", "--icase", "!", "--string", "x-aws-ec2-metadata-token:",
		// The proxies' own probe of the upstream's IMDSv1 policy is not a client's request.
		"-m", "string", "--algo", "bm", "--icase", "!", "--string", "x-imds-proxy-probe:",
		"-m", "comment", "--comment", tokenlessComment)
	var args []string
	if tokensRequired {
		args = append(args, "-I")
	}
	e.AEMM = StartAEMMIn(t, e.IMDS, "169.254.169.254:80", args...)
	return e
}

// TokenlessRequests counts the metadata GETs that reached IMDS without a
// token header, as seen on the wire: a counting rule in the imds namespace
// matches packets that carry a GET request line but no token header.
func (e *EC2) TokenlessRequests(t testing.TB) int {
	t.Helper()
	for _, line := range strings.Split(e.IMDS.Run(t, "iptables-nft-save", "-c", "-t", "filter"), "\n") {
		if !strings.Contains(line, tokenlessComment) {
			continue
		}
		var packets, bytes int
		if _, err := fmt.Sscanf(line, "[%d:%d]", &packets, &bytes); err != nil {
			t.Fatalf("reading the tokenless counter from %q: %v", line, err)
		}
		return packets
	}
	t.Fatal("the tokenless-request counter rule is missing")
	return 0
}

const tokenlessComment = "test: tokenless IMDS requests"
