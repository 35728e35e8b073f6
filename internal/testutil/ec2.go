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
// WiredBy connects the task by another Wiring (a CNI's or Docker's).
// The node reaches IMDS from 169.254.0.1, its address on imdslink, the way
// an instance reaches it over its primary ENI.
//
// amazon-ec2-metadata-mock runs in imds on 169.254.169.254:80. Like real IMDS,
// its token responses leave with IP TTL = the hop limit while every other
// response keeps the normal TTL: a mangle rule in imds sets the TTL of the
// packets that carry the token TTL response header, retransmissions included.
type EC2 struct {
	Node, Task, IMDS *Netns
	// VPC is the rest of the VPC, reached through the node's uplink0
	// (10.200.2.1 and fd00:200:2::1; the VPC side is 10.200.2.2 and
	// fd00:200:2::2); nil without WithVPC.
	VPC    *Netns
	AEMM   *AEMM
	Wiring Wiring
}

// NodeAddr is the node's address towards IMDS, its primary address: what
// a chained sidecar names as its upstream.
const NodeAddr = "169.254.0.1"

// TokenResponseMarker is the response header only token responses carry.
const TokenResponseMarker = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"

// EC2Option sets what an EC2 differs in from the default: hop limit 1,
// tokens required (HttpTokens=required), the task on RoutedVeth, IPv4 only,
// no VPC beyond the node.
type EC2Option func(*ec2Config)

type ec2Config struct {
	hopLimit      int
	imdsV1Allowed bool
	wiring        Wiring
	ipv6, vpc     bool
}

// HopLimit sets the instance's metadata hop limit: the IP TTL of token
// responses.
func HopLimit(n int) EC2Option { return func(c *ec2Config) { c.hopLimit = n } }

// IMDSv1Allowed lets IMDS answer tokenless requests (HttpTokens=optional).
func IMDSv1Allowed() EC2Option { return func(c *ec2Config) { c.imdsV1Allowed = true } }

// WiredBy connects the task to the node by wiring.
func WiredBy(wiring Wiring) EC2Option { return func(c *ec2Config) { c.wiring = wiring } }

// WithIPv6 adds IPv6 on the RoutedVeth path: the task fd00:200:1::2 routed
// by the node (fd00:200:1::1 on cveth0, forwarding IPv6), and IMDS's IPv6
// address fd00:ec2::254 behind it (the node is fd00:ec2::1 on imdslink).
// amazon-ec2-metadata-mock still listens on IPv4 only.
func WithIPv6() EC2Option { return func(c *ec2Config) { c.ipv6 = true } }

// WithVPC adds the VPC namespace beyond the node's uplink0 (EC2.VPC).
func WithVPC() EC2Option { return func(c *ec2Config) { c.vpc = true } }

// NewEC2 builds the topology, as the options say.
func NewEC2(t testing.TB, opts ...EC2Option) *EC2 {
	t.Helper()
	c := ec2Config{hopLimit: 1, wiring: RoutedVeth}
	for _, opt := range opts {
		opt(&c)
	}
	e := &EC2{Node: NewNetns(t), Task: NewNetns(t), IMDS: NewNetns(t), Wiring: c.wiring}
	Veth(t, e.Node, "imdslink", NodeAddr+"/16", e.IMDS, "eth0", "169.254.169.254/16")
	if c.wiring.wire != nil {
		c.wiring.wire(t, e.Node, e.Task)
	}
	e.IMDS.Run(t, "ip", "route", "add", "default", "via", "169.254.0.1")
	e.Node.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	if c.ipv6 {
		e.addIPv6(t)
	}
	if c.vpc {
		e.VPC = NewNetns(t)
		Veth(t, e.Node, "uplink0", "10.200.2.1/24", e.VPC, "eth0", "10.200.2.2/24")
		e.VPC.Run(t, "ip", "route", "add", "default", "via", "10.200.2.1")
		e.Node.Run(t, "ip", "-6", "addr", "add", "fd00:200:2::1/64", "dev", "uplink0", "nodad")
		e.VPC.Run(t, "ip", "-6", "addr", "add", "fd00:200:2::2/64", "dev", "eth0", "nodad")
	}
	e.IMDS.Run(t, "iptables-nft", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--sport", "80",
		"-m", "string", "--string", TokenResponseMarker, "--algo", "bm",
		"-j", "TTL", "--ttl-set", strconv.Itoa(c.hopLimit))
	e.IMDS.Run(t, "iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "80",
		"-m", "string", "--algo", "bm", "--string", "GET /",
		"-m", "string", "--algo", "bm", "--icase", "!", "--string", "x-aws-ec2-metadata-token:",
		// The proxies' own probe of the upstream's IMDSv1 policy is not a client's request.
		"-m", "string", "--algo", "bm", "--icase", "!", "--string", "x-imds-proxy-probe:",
		"-m", "comment", "--comment", tokenlessComment)
	var args []string
	if !c.imdsV1Allowed {
		args = append(args, "-I")
	}
	e.AEMM = StartAEMMIn(t, e.IMDS, "169.254.169.254:80", args...)
	return e
}

// addIPv6 is WithIPv6.
func (e *EC2) addIPv6(t testing.TB) {
	t.Helper()
	if e.Wiring.Name != RoutedVeth.Name {
		t.Fatalf("WithIPv6 knows the RoutedVeth wiring only, not %s", e.Wiring.Name)
	}
	e.Task.Run(t, "ip", "-6", "addr", "add", "fd00:200:1::2/64", "dev", "eth0", "nodad")
	e.Node.Run(t, "ip", "-6", "addr", "add", "fd00:200:1::1/64", "dev", "cveth0", "nodad")
	e.Task.Run(t, "ip", "-6", "route", "add", "default", "via", "fd00:200:1::1")
	e.Node.Run(t, "ip", "-6", "addr", "add", "fd00:ec2::1/64", "dev", "imdslink", "nodad")
	e.IMDS.Run(t, "ip", "-6", "addr", "add", "fd00:ec2::254/64", "dev", "eth0", "nodad")
	e.IMDS.Run(t, "ip", "-6", "route", "add", "default", "via", "fd00:ec2::1")
	e.Node.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
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
