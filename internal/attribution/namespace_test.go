package attribution_test

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/internal/attribution"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// TestCallersAcrossNamespaces: a connection from a container in a network
// namespace of its own, as a node agent receives it, is traced to that
// namespace, the process holding the socket, and the container and pod
// its cgroup names; the address is then known without a scan.
func TestCallersAcrossNamespaces(t *testing.T) {
	node, pod := testutil.NewNetns(t), testutil.NewNetns(t)
	testutil.Veth(t, node, "cni0", "10.77.0.1/24", pod, "eth0", "10.77.0.2/24")
	const podUID = "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718"
	const containerID = "4b825dc642cb6eb9a060e54bf8d69288fbee4904a8f7b1d3e2c6f0a9b8c7d6e5"
	cgroups := testutil.NewCgroups(t)
	client, app := cgroups.ConnectedApp(t, node, pod, "10.77.0.1", "kubepods/besteffort/pod"+podUID+"/"+containerID)

	callers := attribution.NewCallers(attribution.Attributor{}, time.Minute)
	if _, _, ok := callers.Known(client); ok {
		t.Fatal("an address never looked up is known")
	}
	ns, container, ok := callers.Find(client)
	want := attribution.Container{Runtime: "containerd", ID: containerID, PodUID: podUID}
	if !ok || container != want {
		t.Fatalf("Find(%s) = %+v, %v; want %+v", client, container, ok, want)
	}
	other := netip.AddrPortFrom(client.Addr(), client.Port()+1) // another connection of the same pod
	if _, c, ok := callers.Known(other); !ok || c != want {
		t.Errorf("Known(%s) = %+v, %v; want the address remembered", other, c, ok)
	}

	proc := attribution.Attributor{}.LookupIn(ns, client)
	if proc.PID == 0 || !strings.HasSuffix(proc.Executable, "/sleep") || proc.Container != want || proc.UID == nil || *proc.UID != 0 {
		t.Errorf("LookupIn = %+v (uid %v), want the process holding the socket (sleep, which bash became) in the container", proc, proc.UID)
	}
	if got := (attribution.Attributor{}).Lookup(client); got.PID != 0 {
		t.Errorf("Lookup in the reader's own namespace found %+v, which is in another", got)
	}

	cgroups.Kill(t, "kubepods/besteffort/pod"+podUID+"/"+containerID)
	_ = app.Wait()
	if _, _, ok := callers.Known(client); ok {
		t.Error("the address is still known once the namespace's processes are gone")
	}
}
