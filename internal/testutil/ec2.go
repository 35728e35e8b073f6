package testutil

import (
	"strconv"
	"strings"
	"testing"
)

// EC2 is an EC2 instance in miniature, in namespaces the test owns:
//
//	task (10.200.1.2) --cveth0-- node (10.200.1.1, forwards) --imdslink-- imds (169.254.169.254)
//
// amazon-ec2-metadata-mock runs in imds on 169.254.169.254:80. Like real IMDS,
// its token responses leave with IP TTL = the hop limit while every other
// response keeps the normal TTL: a mangle rule in imds sets the TTL of the
// packets that carry the token TTL response header, retransmissions included.
type EC2 struct {
	Node, Task, IMDS *Netns
	AEMM             *AEMM
}

// TokenResponseMarker is the response header only token responses carry.
const TokenResponseMarker = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"

// NewEC2 builds the topology with the given hop limit; tokensRequired runs
// AEMM with -I, as an instance with HttpTokens=required.
func NewEC2(t testing.TB, hopLimit int, tokensRequired bool) *EC2 {
	t.Helper()
	e := &EC2{Node: NewNetns(t), Task: NewNetns(t), IMDS: NewNetns(t)}
	Veth(t, e.Node, "cveth0", "10.200.1.1/24", e.Task, "eth0", "10.200.1.2/24")
	Veth(t, e.Node, "imdslink", "169.254.0.1/16", e.IMDS, "eth0", "169.254.169.254/16")
	e.Task.Run(t, "ip", "route", "add", "default", "via", "10.200.1.1")
	e.IMDS.Run(t, "ip", "route", "add", "default", "via", "169.254.0.1")
	e.Node.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	e.IMDS.Run(t, "iptables-nft", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--sport", "80",
		"-m", "string", "--string", TokenResponseMarker, "--algo", "bm",
		"-j", "TTL", "--ttl-set", strconv.Itoa(hopLimit))
	var args []string
	if tokensRequired {
		args = append(args, "-I")
	}
	e.AEMM = StartAEMMIn(t, e.IMDS, "169.254.169.254:80", args...)
	return e
}

// TokenlessRequests counts the metadata requests that reached AEMM without a
// token, served (IMDSv1 allowed) or refused (tokens required): AEMM logs
// each request's headers as it checks them.
func (e *EC2) TokenlessRequests() int {
	n := 0
	for _, line := range strings.Split(e.AEMM.Logs(), "\n") {
		if strings.Contains(line, "ValidateToken Received request") && !strings.Contains(line, "X-Aws-Ec2-Metadata-Token:[") {
			n++
		}
	}
	return n
}
