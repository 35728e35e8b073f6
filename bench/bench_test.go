package bench

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// How much each benchmark does besides b.N.
const (
	// putConcurrency is how many clients BenchmarkTokenPUT and
	// BenchmarkMintMemory send their PUTs from.
	putConcurrency = 64
	// burstSize is how many SDK credential fetches one burst starts at once.
	burstSize = 1000
	// loadTimeLimit bounds one load whatever b.N is, so that a stuck or
	// slow target cannot hold a benchmark up.
	loadTimeLimit = 60 * time.Second
)

// getConcurrencies are the numbers of clients BenchmarkMetadataGET
// measures each target at.
var getConcurrencies = []int{1, 16, 64, 256}

// targets are the four things the load goes to: the stand-in itself,
// nginx in front of it, and imds-proxy in front of it as a plain
// forwarding proxy and with its defaults.
type targets struct {
	up                                   *standIn
	direct, nginx, passThrough, defaults *target
	// nginxErr says why nginx is nil.
	nginxErr error
}

// startTargets builds imds-proxy and starts the stand-in and every target
// (nginx only where it is installed), logging what they run on.
func startTargets(b *testing.B) *targets {
	b.Helper()
	proxyBin := testutil.BuildProxy(b)
	ts := &targets{up: startStandIn(b)}
	ts.direct = &target{name: "direct", addr: ts.up.Addr}
	nginxBin, err := nginxPath()
	ts.nginxErr = err
	nginxVersion := errString(err)
	if err == nil {
		n := startNginx(b, nginxBin, ts.up.Addr)
		ts.nginx = &target{name: "nginx", addr: n.addr, pids: n.pids}
		out, _ := exec.Command(nginxBin, "-v").CombinedOutput()
		nginxVersion = strings.TrimSpace(string(out))
	}
	pt := startProxy(b, proxyBin, ts.up.URL, passThroughFlags...)
	ts.passThrough = &target{name: "passthrough", addr: pt.addr, pids: pt.pids}
	d := startProxy(b, proxyBin, ts.up.URL)
	ts.defaults = &target{name: "defaults", addr: d.addr, pids: d.pids}
	b.Logf("%d CPUs, %s/%s, %s; load generator and IMDS stand-in in the benchmark process, each target a separate process; loopback only; "+
		"%s; imds-proxy passthrough: %s; defaults: caching and coalescing on",
		runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, runtime.Version(), nginxVersion, strings.Join(passThroughFlags, " "))
	return ts
}

// run measures tg under name as a sub-benchmark; nginx, when missing, is
// skipped (outside CI, which must have it: make bench installs it).
func (ts *targets) run(b *testing.B, name string, tg *target, measure func(b *testing.B, tg *target)) {
	b.Run(name, func(b *testing.B) {
		if tg == nil {
			testutil.SkipOutsideCI(b, errString(ts.nginxErr)+" (make bench installs it)")
		}
		measure(b, tg)
	})
}

// BenchmarkMetadataGET is GET instance-id with a token of the target's,
// b.N requests in all from conc clients, each on its own keep-alive
// connection, against the stand-in directly, through nginx and through
// imds-proxy as a plain forwarding proxy and with its defaults. It logs
// the figures as a table, each target next to nginx.
func BenchmarkMetadataGET(b *testing.B) {
	ts := startTargets(b)
	results := map[*target]map[int]cell{}
	for _, conc := range getConcurrencies {
		for _, tg := range []*target{ts.direct, ts.nginx, ts.passThrough, ts.defaults} {
			name := "nginx"
			if tg != nil {
				name = tg.name
			}
			ts.run(b, fmt.Sprintf("%s/conc=%d", name, conc), tg, func(b *testing.B, tg *target) {
				tok, err := fetchToken(tg.addr)
				if err != nil {
					b.Fatalf("%s: %v", tg.name, err)
				}
				c := ts.measure(b, tg, load{addr: tg.addr, method: http.MethodGet, path: metadataGET,
					header: map[string]string{imdsapi.TokenHeader: tok}, conc: conc})
				c.report(b, "req/s")
				if results[tg] == nil {
					results[tg] = map[int]cell{}
				}
				results[tg][conc] = c
			})
		}
	}
	b.Log("\n" + ts.getTable(results))
}

// getTable is BenchmarkMetadataGET's figures side by side, with the
// targets (logged, never asserted).
func (ts *targets) getTable(results map[*target]map[int]cell) string {
	var out strings.Builder
	tb := newTable("target", "conc", "requests", "req/s", "vs nginx", "p50", "p99", "CPU s/10k req", "peak RSS MiB",
		"upstream reqs", "upstream conns", "errors", "other load")
	var thr, p50s, cached []string
	var maxPeak int64
	for _, conc := range getConcurrencies {
		ng, haveNginx := results[ts.nginx][conc]
		for _, tg := range []*target{ts.direct, ts.nginx, ts.passThrough, ts.defaults} {
			c, ok := results[tg][conc]
			if !ok {
				continue
			}
			vs := "-"
			if haveNginx {
				vs = ratio(c.res.rate(), ng.res.rate())
			}
			tb.add(tg.name, fmt.Sprint(conc), count(c.res.ok), rate(c.res.rate()), vs, dur(c.res.p50), dur(c.res.p99),
				c.cpuPer10k(), c.peak(), count(c.upstream), count(c.upConns), count(c.res.errs), c.otherLoad())
		}
		pt, d := results[ts.passThrough][conc], results[ts.defaults][conc]
		maxPeak = max(maxPeak, pt.peakKiB, d.peakKiB)
		if haveNginx {
			thr = append(thr, fmt.Sprintf("c=%d %s", conc, ratio(pt.res.rate(), ng.res.rate())))
			p50s = append(p50s, fmt.Sprintf("c=%d %s vs %s", conc, dur(pt.res.p50), dur(ng.res.p50)))
			cached = append(cached, fmt.Sprintf("c=%d %s", conc, ratio(d.res.rate(), ng.res.rate())))
		}
	}
	tb.print(&out)
	fmt.Fprintln(&out, "CPU: utime+stime of the target's processes (nginx: master and workers) per 10,000 answered requests; "+
		"peak RSS: VmHWM summed over them during the cell; upstream: what the stand-in received and accepted during the cell; "+
		"CPU and other load: - when the cell was too short for /proc's 10 ms ticks")
	fmt.Fprintln(&out, otherLoadNote)
	noNginx := "n/a (" + errString(ts.nginxErr) + ")"
	fmt.Fprintln(&out, "targets (logged, not asserted):")
	fmt.Fprintf(&out, "  passthrough throughput >= nginx       measured: %s\n", orElse(strings.Join(thr, ", "), noNginx))
	fmt.Fprintf(&out, "  passthrough p50 no worse than nginx   measured: %s\n", orElse(strings.Join(p50s, ", "), noNginx))
	fmt.Fprintf(&out, "  with caching >= 5x nginx throughput   measured: %s\n", orElse(strings.Join(cached, ", "), noNginx))
	fmt.Fprintf(&out, "  peak RSS < 30 MiB under load          measured: %s MiB at most (imds-proxy rows)\n", mib(maxPeak))
	return out.String()
}

// BenchmarkTokenPUT is PUT /latest/api/token (TTL 21600), b.N requests
// from putConcurrency clients: imds-proxy mints the tokens itself, nginx
// forwards them to the stand-in.
func BenchmarkTokenPUT(b *testing.B) {
	ts := startTargets(b)
	for _, tg := range []struct {
		name string
		*target
	}{{"imds-proxy", ts.passThrough}, {"nginx", ts.nginx}} {
		ts.run(b, tg.name, tg.target, func(b *testing.B, tg *target) {
			ts.measure(b, tg, load{addr: tg.addr, method: http.MethodPut, path: imdsapi.TokenPath,
				header: map[string]string{imdsapi.TokenTTLHeader: "21600"}, conc: putConcurrency}).report(b, "PUT/s")
		})
	}
}

// cell is one measured load against one target.
type cell struct {
	res      loadResult
	cpu      float64 // seconds, -1 when not separable
	peakKiB  int64   // -1 when not separable
	upstream int64   // requests the stand-in received during the cell
	upConns  int64   // connections it accepted during the cell
	other    float64 // cores busy outside the benchmark during the cell
}

// measure runs l with b.N requests against tg, timing only the load
// itself, and samples tg's processes around it.
func (ts *targets) measure(b *testing.B, tg *target, l load) cell {
	b.StopTimer()
	l.maxReqs, l.maxTime, l.warmup = int64(b.N), loadTimeLimit, true
	c := cell{cpu: -1, peakKiB: -1}
	var pids []int
	if tg.pids != nil {
		pids = tg.pids()
		if !resetPeak(pids) {
			b.Log("peak RSS is since the target started: resetting it through /proc/PID/clear_refs failed")
		}
	}
	var cpu0 float64
	var up0, conns0 int64
	var others otherLoad
	l.before = func() {
		up0, conns0 = ts.up.requests.Load(), ts.up.conns.Load()
		if pids != nil {
			cpu0 = cpuSeconds(pids)
		}
		others = startOtherLoad()
		b.ResetTimer()
		b.StartTimer()
	}
	c.res = l.run()
	b.StopTimer()
	c.upstream, c.upConns = ts.up.requests.Load()-up0, ts.up.conns.Load()-conns0
	if pids != nil {
		c.cpu = cpuSeconds(pids) - cpu0
		c.peakKiB = memKiB(pids, "VmHWM")
	}
	c.other = others.cores(c.cpu, c.res.elapsed)
	if c.res.firstErr != "" {
		b.Logf("%s errors, first: %s", count(c.res.errs), c.res.firstErr)
	}
	return c
}

// report reports the cell's figures as the benchmark's metrics; rateUnit
// names its throughput. CPU and the load of other processes are left out
// of a cell too short for /proc's ticks, and CPU and peak RSS of a target
// in the benchmark process.
func (c cell) report(b *testing.B, rateUnit string) {
	b.ReportMetric(c.res.rate(), rateUnit)
	b.ReportMetric(float64(c.res.p50.Microseconds()), "p50-us")
	b.ReportMetric(float64(c.res.p99.Microseconds()), "p99-us")
	b.ReportMetric(float64(c.upstream)/float64(b.N), "upstream-reqs/op")
	b.ReportMetric(float64(c.upConns), "upstream-conns")
	b.ReportMetric(float64(c.res.errs), "errors")
	if c.peakKiB >= 0 {
		b.ReportMetric(float64(c.peakKiB)/1024, "peak-RSS-MiB")
	}
	if c.sampled() && c.cpu >= 0 {
		b.ReportMetric(c.cpu/float64(c.res.ok)*10000, "CPU-s/10k-req")
	}
	if c.sampled() {
		b.ReportMetric(c.other, "other-load-cores")
	}
}

// minSampled is the shortest cell whose CPU figures mean something: /proc
// counts CPU time in 10 ms ticks.
const minSampled = 500 * time.Millisecond

func (c cell) sampled() bool { return c.res.elapsed >= minSampled && c.res.ok > 0 }

func (c cell) cpuPer10k() string {
	if c.cpu < 0 || !c.sampled() {
		return "-"
	}
	return fmt.Sprintf("%.3f", c.cpu/float64(c.res.ok)*10000)
}

func (c cell) otherLoad() string {
	if !c.sampled() {
		return "-"
	}
	return fmt.Sprintf("%.2f", c.other)
}

func (c cell) peak() string {
	if c.peakKiB < 0 {
		return "-"
	}
	return mib(c.peakKiB)
}

// BenchmarkMintMemory is the memory of a fresh imds-proxy minting b.N
// tokens over HTTP (PUT, TTL 21600, from putConcurrency clients): its RSS
// before, half-way and at the end, and its peak. `make bench` runs a
// million.
func BenchmarkMintMemory(b *testing.B) {
	proxyBin := testutil.BuildProxy(b)
	up := startStandIn(b)
	var samples []mintSample
	b.Run("fresh-proxy", func(b *testing.B) {
		b.StopTimer()
		px := startProxy(b, proxyBin, up.URL)
		pids := px.pids()
		samples = []mintSample{{0, memKiB(pids, "VmRSS"), 0}}
		var mu sync.Mutex
		var t0 time.Time
		var others otherLoad
		var cpu0 float64
		half := max(int64(b.N)/2, 1)
		res := load{addr: px.addr, method: http.MethodPut, path: imdsapi.TokenPath, header: map[string]string{imdsapi.TokenTTLHeader: "21600"},
			conc: putConcurrency, maxReqs: int64(b.N), maxTime: loadTimeLimit,
			before: func() {
				t0, others, cpu0 = time.Now(), startOtherLoad(), cpuSeconds(pids)
				b.ResetTimer()
				b.StartTimer()
			},
			onOK: func(n int64) {
				if n == half {
					s := mintSample{n, memKiB(pids, "VmRSS"), time.Since(t0)}
					mu.Lock()
					samples = append(samples, s)
					mu.Unlock()
				}
			}}.run()
		b.StopTimer()
		end := mintSample{res.ok, memKiB(pids, "VmRSS"), res.elapsed}
		mu.Lock()
		samples = append(samples, end)
		mu.Unlock()
		b.ReportMetric(res.rate(), "mints/s")
		b.ReportMetric(mibOf(samples[0].rssKiB), "RSS-start-MiB")
		if len(samples) == 3 {
			b.ReportMetric(mibOf(samples[1].rssKiB), "RSS-half-MiB")
		}
		b.ReportMetric(mibOf(end.rssKiB), "RSS-end-MiB")
		b.ReportMetric(mibOf(memKiB(pids, "VmHWM")), "peak-RSS-MiB")
		b.ReportMetric(float64(res.errs), "errors")
		if (cell{res: res}).sampled() {
			b.ReportMetric(others.cores(cpuSeconds(pids)-cpu0, res.elapsed), "other-load-cores")
		}
		if res.firstErr != "" {
			b.Logf("%s errors, first: %s", count(res.errs), res.firstErr)
		}
	})
	tb := newTable("tokens minted", "VmRSS MiB", "elapsed", "mints/s so far")
	for _, s := range samples {
		r := "-"
		if s.at > 0 {
			r = rate(float64(s.mints) / s.at.Seconds())
		}
		tb.add(count(s.mints), mib(s.rssKiB), dur(s.at), r)
	}
	var out strings.Builder
	tb.print(&out)
	b.Log("\n" + out.String() + "target (logged, not asserted): memory flat after 1M mints")
}

// mintSample is the proxy's RSS after it minted so many tokens.
type mintSample struct {
	mints  int64
	rssKiB int64
	at     time.Duration
}

func mibOf(kib int64) float64 { return float64(kib) / 1024 }

// BenchmarkCredentialBurst is bursts of burstSize AWS SDK for Go v2
// credential fetches started at once, every one with its own IMDS client
// (ec2rolecreds on a fresh imds.New), against amazon-ec2-metadata-mock
// directly and through a fresh imds-proxy (defaults) per burst: one op is
// one burst, and upstream-reqs/op is what one burst costs the mock.
func BenchmarkCredentialBurst(b *testing.B) {
	proxyBin := testutil.BuildProxy(b)
	for _, viaProxy := range []bool{false, true} {
		name := map[bool]string{false: "direct", true: "imds-proxy"}[viaProxy]
		b.Run(name, func(b *testing.B) {
			b.StopTimer()
			tap := startCountedAEMM(b)
			var puts, gets, errs int64
			var fetches []time.Duration
			for range b.N {
				endpoint := tap.URL()
				if viaProxy {
					endpoint = "http://" + startProxy(b, proxyBin, tap.URL()).addr
				}
				before := len(tap.Requests()) // the proxy's own session token PUT is not the burst's
				b.StartTimer()
				r := credentialBurst(endpoint, burstSize)
				b.StopTimer()
				for _, req := range tap.Requests()[before:] {
					if req.Method == http.MethodPut {
						puts++
					} else {
						gets++
					}
				}
				errs += r.errs
				fetches = append(fetches, r.times...)
				if r.firstErr != "" {
					b.Logf("%s errors, first: %s", count(r.errs), r.firstErr)
				}
			}
			slices.Sort(fetches)
			b.ReportMetric(float64(puts+gets)/float64(b.N), "upstream-reqs/op")
			b.ReportMetric(float64(puts)/float64(b.N), "upstream-PUTs/op")
			b.ReportMetric(float64(gets)/float64(b.N), "upstream-GETs/op")
			b.ReportMetric(float64(errs)/float64(b.N), "errors/op")
			if len(fetches) > 0 {
				b.ReportMetric(float64(fetches[len(fetches)/2].Microseconds())/1000, "fetch-p50-ms")
				b.ReportMetric(float64(fetches[len(fetches)*99/100].Microseconds())/1000, "fetch-p99-ms")
			}
		})
	}
	b.Logf("upstream: requests that reached the mock during a burst of %s fetches; a token PUT is serialised in front of the mock, "+
		"which crashes under concurrent ones (see aemm_test.go); target (logged, not asserted): "+
		"<= 5 upstream requests for 1,000 credential fetches through the proxy (about 2,000 without)", count(burstSize))
}

const otherLoadNote = "other load: cores busy outside the benchmark during the cell (machine user+system time less the benchmark " +
	"process's and the target's); above ~0.1 something else on the machine disturbed the figures"

type burstResult struct {
	ok, errs int64
	// times are the successful fetches' durations.
	times    []time.Duration
	firstErr string
}

// credentialBurst starts n goroutines at once, each retrieving role
// credentials through a fresh provider and IMDS client: nothing is shared.
func credentialBurst(endpoint string, n int) burstResult {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var (
		wg       sync.WaitGroup
		start    = make(chan struct{})
		mu       sync.Mutex
		r        burstResult
		ok, errs atomic.Int64
	)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := imds.New(imds.Options{Endpoint: endpoint})
			provider := ec2rolecreds.New(func(o *ec2rolecreds.Options) { o.Client = client })
			<-start
			t0 := time.Now()
			creds, err := provider.Retrieve(ctx)
			d := time.Since(t0)
			if err == nil && creds.AccessKeyID == "" {
				err = errors.New("empty credentials")
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs.Add(1)
				if r.firstErr == "" {
					r.firstErr = err.Error()
				}
				return
			}
			ok.Add(1)
			r.times = append(r.times, d)
		}()
	}
	close(start)
	wg.Wait()
	r.ok, r.errs = ok.Load(), errs.Load()
	return r
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func orElse(s, alt string) string {
	if s == "" {
		return alt
	}
	return s
}
