package testutil

import (
	"strings"
	"testing"
	"time"
)

// Wiring is how a container runtime or CNI plugin connects a container's
// network namespace to the node, reproduced as the plugin does it (the
// host-side interface name, its addresses or lack of them, the routes, and
// how the container finds its gateway's MAC address).
type Wiring struct {
	// Name names the wiring in test output.
	Name string
	// Interfaces is the node agent's --interfaces value that matches the
	// host side (an iptables wildcard).
	Interfaces string
	// ContainerAddr is the container's IPv4 address.
	ContainerAddr string
	wire          func(t testing.TB, node, task *Netns)
}

// The wirings the node agent must work on.
var (
	// DockerEngine leaves the task namespace unconnected: a real Docker
	// engine started in the node namespace (StartDocker) wires its
	// containers on docker0 and br-* itself.
	DockerEngine = Wiring{Name: "real Docker engine", Interfaces: "docker0,br-+"}
	// RoutedVeth is the harness's original, idealised wiring: a veth whose
	// host side carries an IPv4 address that is the container's gateway.
	RoutedVeth = Wiring{Name: "routed veth with an address", Interfaces: "cveth+", ContainerAddr: "10.200.1.2",
		wire: func(t testing.TB, node, task *Netns) {
			Veth(t, node, "cveth0", "10.200.1.1/24", task, "eth0", "10.200.1.2/24")
			task.Run(t, "ip", "route", "add", "default", "via", "10.200.1.1")
		}}
	// DockerBridge is Docker's default network (and ECS bridge mode): the
	// container's veth is a port of docker0, which holds the gateway
	// address, and traffic leaving the bridge is masqueraded.
	DockerBridge = Wiring{Name: "Docker bridge (docker0)", Interfaces: "docker0", ContainerAddr: "172.17.0.2",
		wire: func(t testing.TB, node, task *Netns) {
			node.Run(t, "ip", "link", "add", "docker0", "type", "bridge")
			node.Run(t, "ip", "addr", "add", "172.17.0.1/16", "dev", "docker0")
			node.Run(t, "ip", "link", "set", "docker0", "up")
			node.Run(t, "ip", "link", "add", "veth1c0ffee", "type", "veth", "peer", "name", "eth0", "netns", task.Name)
			node.Run(t, "ip", "link", "set", "veth1c0ffee", "master", "docker0", "up")
			task.Run(t, "ip", "addr", "add", "172.17.0.2/16", "dev", "eth0")
			task.Run(t, "ip", "link", "set", "eth0", "up")
			task.Run(t, "ip", "route", "add", "default", "via", "172.17.0.1")
			node.Run(t, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "!", "-o", "docker0", "-j", "MASQUERADE")
		}}
	// VPCCNI is the Amazon VPC CNI: the host-side eni* veth has no IPv4
	// address, the node routes the pod by a /32 route, and the pod's
	// gateway 169.254.1.1 is a static neighbour entry pointing at the host
	// veth's MAC (amazon-vpc-cni-k8s, cmd/routed-eni-cni-plugin/driver).
	VPCCNI = Wiring{Name: "Amazon VPC CNI (eni*, static neighbour)", Interfaces: "eni+", ContainerAddr: "10.0.5.17",
		wire: func(t testing.TB, node, task *Netns) {
			addressless(t, node, "eni3f2a9c1d8e7", task, "10.0.5.17", "169.254.1.1")
			task.Run(t, "ip", "neigh", "add", "169.254.1.1", "dev", "eth0", "lladdr", mac(t, node, "eni3f2a9c1d8e7"), "nud", "permanent")
		}}
	// Calico is Calico's wiring: an address-less cali* veth with the MAC
	// ee:ee:ee:ee:ee:ee, a /32 route, and the pod's gateway 169.254.1.1
	// answered by proxy ARP on the host veth.
	Calico = Wiring{Name: "Calico (cali*, proxy ARP)", Interfaces: "cali+", ContainerAddr: "10.244.7.9",
		wire: func(t testing.TB, node, task *Netns) {
			node.Run(t, "ip", "link", "add", "cali8d2e3f4a5b6", "address", "ee:ee:ee:ee:ee:ee", "type", "veth", "peer", "name", "eth0", "netns", task.Name)
			node.Run(t, "sysctl", "-qw", "net.ipv4.conf.cali8d2e3f4a5b6.proxy_arp=1", "net.ipv4.neigh.cali8d2e3f4a5b6.proxy_delay=0")
			addressless(t, node, "cali8d2e3f4a5b6", task, "10.244.7.9", "169.254.1.1")
		}}
	// Cilium is Cilium's wiring with iptables still in the path (legacy host
	// routing): an address-less lxc* veth, a /32 route, and the pod's
	// gateway, the router address on cilium_host, resolved to the lxc MAC
	// (Cilium's eBPF answers that ARP; a static neighbour entry here).
	Cilium = Wiring{Name: "Cilium (lxc*, legacy host routing)", Interfaces: "lxc+", ContainerAddr: "10.0.1.77",
		wire: func(t testing.TB, node, task *Netns) {
			node.Run(t, "ip", "link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net")
			node.Run(t, "ip", "addr", "add", "10.0.1.1/32", "dev", "cilium_host")
			node.Run(t, "ip", "link", "set", "cilium_host", "up")
			node.Run(t, "ip", "link", "set", "cilium_net", "up")
			addressless(t, node, "lxc6a7b8c9d0e1", task, "10.0.1.77", "10.0.1.1")
			task.Run(t, "ip", "neigh", "add", "10.0.1.1", "dev", "eth0", "lladdr", mac(t, node, "lxc6a7b8c9d0e1"), "nud", "permanent")
		}}
)

// addressless connects task to node by a veth whose host side, hostIf,
// carries no IPv4 address: the node routes addr/32 to it, and the task
// reaches its gateway gw as an on-link /32 (how the VPC CNI, Calico and
// Cilium wire pods). The host veth is created first if it does not exist.
func addressless(t testing.TB, node *Netns, hostIf string, task *Netns, addr, gw string) {
	t.Helper()
	if !strings.Contains(node.Run(t, "ip", "-o", "link", "show"), hostIf+"@") {
		node.Run(t, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", task.Name)
	}
	node.Run(t, "ip", "link", "set", hostIf, "up")
	node.Run(t, "ip", "route", "add", addr+"/32", "dev", hostIf, "scope", "link")
	task.Run(t, "ip", "addr", "add", addr+"/32", "dev", "eth0")
	task.Run(t, "ip", "link", "set", "eth0", "up")
	task.Run(t, "ip", "route", "add", gw, "dev", "eth0", "scope", "link")
	task.Run(t, "ip", "route", "add", "default", "via", gw, "dev", "eth0")
}

// AddVPCCNIPod wires one more pod to e's node as the VPC CNI does (see
// VPCCNI): addr on the pod's eth0, hostIf (eni…) on the node.
func AddVPCCNIPod(t testing.TB, e *EC2, hostIf, addr string) *Netns {
	t.Helper()
	pod := NewNetns(t)
	addressless(t, e.Node, hostIf, pod, addr, "169.254.1.1")
	pod.Run(t, "ip", "neigh", "add", "169.254.1.1", "dev", "eth0", "lladdr", mac(t, e.Node, hostIf), "nud", "permanent")
	return pod
}

// mac is the MAC address of a link in ns.
func mac(t testing.TB, ns *Netns, link string) string {
	t.Helper()
	fields := strings.Fields(ns.Run(t, "cat", "/sys/class/net/"+link+"/address"))
	if len(fields) != 1 {
		t.Fatalf("no MAC address for %s in %s", link, ns)
	}
	return fields[0]
}

// NodeAddrs are the node namespace's IPv4 addresses other than loopback:
// every address a container could try to reach the node on.
func (e *EC2) NodeAddrs(t testing.TB) []string {
	t.Helper()
	var addrs []string
	for _, line := range strings.Split(e.Node.Run(t, "ip", "-4", "-o", "addr", "show"), "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && f[2] == "inet" && !strings.HasPrefix(f[3], "127.") {
			addrs = append(addrs, strings.Split(f[3], "/")[0])
		}
	}
	return addrs
}

// AddVPCCNIIPv6 gives a VPCCNI task the VPC CNI's IPv6 wiring as well: addr
// as a /128, the gateway fe80::1 on-link with a static neighbour entry to
// the host veth's MAC, and a /128 route to the pod on the node. It returns
// once the host veth's link-local address has passed duplicate address
// detection.
func AddVPCCNIIPv6(t testing.TB, e *EC2, addr string) {
	t.Helper()
	const hostIf = "eni3f2a9c1d8e7"
	e.Task.Run(t, "ip", "-6", "addr", "add", addr+"/128", "dev", "eth0", "nodad")
	e.Task.Run(t, "ip", "-6", "route", "add", "fe80::1", "dev", "eth0")
	e.Task.Run(t, "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
	e.Task.Run(t, "ip", "-6", "neigh", "add", "fe80::1", "dev", "eth0", "lladdr", mac(t, e.Node, hostIf), "nud", "permanent")
	e.Node.Run(t, "ip", "-6", "route", "add", addr+"/128", "dev", hostIf)
	deadline := time.Now().Add(10 * time.Second)
	for strings.Contains(e.Node.Run(t, "ip", "-6", "addr", "show", "dev", hostIf, "scope", "link"), "tentative") {
		if time.Now().After(deadline) {
			t.Fatalf("the link-local address of %s is still tentative", hostIf)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
