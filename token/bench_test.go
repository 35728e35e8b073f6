package token_test

import (
	"errors"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/token"
)

var benchCaller = netip.MustParseAddr("10.0.0.1")

func benchMinter(tb testing.TB) *token.Minter {
	tb.Helper()
	m, err := token.NewMinter(fuzzKey, nil) // the real clock, as in the proxy
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

// reportRate adds what per second, from b.N and the measured time (for
// RunParallel: all goroutines together).
func reportRate(b *testing.B, what string) {
	if s := b.Elapsed().Seconds(); s > 0 {
		b.ReportMetric(float64(b.N)/s, what+"/s")
	}
}

func BenchmarkMint(b *testing.B) {
	m := benchMinter(b)
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := m.Mint(benchCaller, 300*time.Second); err != nil {
				b.Fatal(err)
			}
		}
		reportRate(b, "mints")
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, _, err := m.Mint(benchCaller, 300*time.Second); err != nil {
					b.Error(err)
					return
				}
			}
		})
		reportRate(b, "mints")
	})
}

func BenchmarkVerify(b *testing.B) {
	m := benchMinter(b)
	tok, _, err := m.Mint(benchCaller, token.MaxTTL)
	if err != nil {
		b.Fatal(err)
	}
	other := netip.MustParseAddr("10.0.0.2")
	for _, c := range []struct {
		name   string
		tok    string
		caller netip.Addr
		want   error
	}{
		{"valid", tok, benchCaller, nil},
		{"other_caller", tok, other, token.ErrForged}, // the full HMAC, then the constant-time compare fails
		{"malformed", tok[:len(tok)-1], benchCaller, token.ErrMalformed},
	} {
		b.Run(c.name+"/serial", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if err := m.Verify(c.tok, c.caller); !errors.Is(err, c.want) {
					b.Fatalf("Verify = %v, want %v", err, c.want)
				}
			}
			reportRate(b, "verifies")
		})
		b.Run(c.name+"/parallel", func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := m.Verify(c.tok, c.caller); !errors.Is(err, c.want) {
						b.Errorf("Verify = %v, want %v", err, c.want)
						return
					}
				}
			})
			reportRate(b, "verifies")
		})
	}
}

// TestMillionTokensKeepNoState mints a million tokens for a thousand callers
// and checks that the heap in use afterwards has not grown with them: tokens
// are stateless, so a flood of token requests costs CPU, never memory. The
// timing is logged, not asserted.
func TestMillionTokensKeepNoState(t *testing.T) {
	n := 1_000_000
	if raceEnabled {
		n = 100_000 // the race detector makes each mint ~10x slower; the property is the same
	}
	m := benchMinter(t)
	var callers [1000]netip.Addr
	for i := range callers {
		callers[i] = netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()
	var last string
	for i := 0; i < n; i++ {
		tok, _, err := m.Mint(callers[i%len(callers)], time.Duration(1+i%21600)*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		last = tok
	}
	elapsed := time.Since(start)
	runtime.GC()
	runtime.ReadMemStats(&after)
	if err := m.Verify(last, callers[(n-1)%len(callers)]); err != nil {
		t.Fatalf("the last token minted does not verify: %v", err)
	}
	growth := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("%d tokens in %s (%.0f mints/s, %d B and %.1f allocations per mint); heap in use %d -> %d bytes (%+d)",
		n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(),
		(after.TotalAlloc-before.TotalAlloc)/uint64(n), float64(after.Mallocs-before.Mallocs)/float64(n),
		before.HeapInuse, after.HeapInuse, growth)
	if growth > 8<<20 {
		t.Errorf("heap in use grew by %d bytes over %d mints; tokens must keep no state", growth, n)
	}
}
