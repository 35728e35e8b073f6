package attribution

import (
	"net"
	"net/netip"
	"os"
	"testing"
)

func TestProcNetAddr(t *testing.T) {
	got := procNetAddr(netip.MustParseAddrPort("127.0.0.1:8169"))
	if got["net/tcp"] != "0100007F:1FE9" || got["net/tcp6"] != "0000000000000000FFFF00000100007F:1FE9" {
		t.Errorf("procNetAddr = %v", got)
	}
}

// BenchmarkAttribution measures what an IMDSv1 request pays to be attributed
// (IMDSv2 requests pay nothing): go test -bench Attribution ./internal/attribution
func BenchmarkAttribution(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	client := netip.MustParseAddrPort(c.LocalAddr().String())
	a := Attributor{}
	if p := a.Lookup(client); p.PID != os.Getpid() {
		b.Fatalf("lookup found %+v, want this process", p)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		a.Lookup(client)
	}
}
