package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// plan is how much each part does: the full benchmark or the smoke run.
type plan struct {
	full                   bool
	concurrencies          []int
	cellReqs               int64
	cellTime               time.Duration
	putConc                int
	putReqs                int64
	putTime                time.Duration
	mintConc               int
	mints                  int64
	mintTime               time.Duration
	credFetches            int
	profileCellConcurrency int
}

var (
	// Each measurement is bounded by count and by time; the whole benchmark
	// stays under three minutes (4 targets x 4 concurrencies x 4 s, 2 x 4 s of
	// token PUTs, at most 60 s of mints, a few seconds of SDK fetches).
	fullPlan = plan{
		full:          true,
		concurrencies: []int{1, 16, 64, 256},
		cellReqs:      2_000_000, cellTime: 4 * time.Second,
		putConc: 64, putReqs: 1_000_000, putTime: 4 * time.Second,
		mintConc: 64, mints: 1_000_000, mintTime: 60 * time.Second,
		credFetches:            1000,
		profileCellConcurrency: 64,
	}
	// The smoke run: tiny counts, one concurrency, well under five seconds.
	smokePlan = plan{
		concurrencies: []int{8},
		cellReqs:      200, cellTime: 2 * time.Second,
		putConc: 8, putReqs: 200, putTime: 2 * time.Second,
		mintConc: 8, mints: 200, mintTime: 5 * time.Second,
		credFetches: 20,
	}
)

// TestBenchTable is the side-by-side load benchmark of issue 7. It prints one
// table per part and asserts none of the figures: only that the benchmark
// itself could run (and, with IMDS_PROXY_BENCH=1 in CI, that nginx is there).
func TestBenchTable(t *testing.T) {
	began := time.Now()
	p := smokePlan
	if os.Getenv("IMDS_PROXY_BENCH") == "1" {
		p = fullPlan
	}
	bins, err := testutil.BuildBinaries()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(bins.Remove)
	built := time.Since(began)
	up := startStandIn(t)

	nginxBin, nginxErr := nginxPath()
	if nginxErr != nil && p.full && os.Getenv("CI") == "true" {
		t.Fatalf("%v: make bench installs it (apt-get install nginx)", nginxErr)
	}
	if nginxErr == nil && !p.full && nginxContainer() == nil {
		nginxErr = errors.New("nginx: left out of the smoke run without root (its workers could outlive a killed test)")
	}

	b := &bench{t: t, plan: p, up: up, proxyBin: bins.Proxy, nginxErr: nginxErr}
	b.header(nginxBin)
	b.direct = &target{name: "direct (Go stand-in)", addr: up.Addr}
	if nginxErr == nil {
		n := startNginx(t, nginxBin, up.Addr)
		b.nginx = &target{name: "nginx", addr: n.addr, pids: n.pids}
	}
	passThroughArgs := passThroughFlags
	if p.full {
		b.pprofAddr = testutil.FreeLoopbackAddr(t)
		passThroughArgs = append([]string{"--pprof-listen", b.pprofAddr}, passThroughFlags...)
	}
	pt := startProxy(t, bins.Proxy, up.URL, passThroughArgs...)
	b.passThrough = &target{name: "imds-proxy pass-through", addr: pt.addr, pids: pt.pids}
	d := startProxy(t, bins.Proxy, up.URL)
	b.defaults = &target{name: "imds-proxy defaults", addr: d.addr, pids: d.pids}

	b.metadataGETs()
	b.tokenPUTs()
	b.mintMemory()
	b.credentialsEconomy()
	fmt.Printf("benchmark took %s (building the binaries %s of it)\n\n",
		time.Since(began).Round(100*time.Millisecond), built.Round(100*time.Millisecond))
}

type bench struct {
	t        *testing.T
	plan     plan
	up       *standIn
	proxyBin string
	nginxErr error
	// The targets; nginx is nil when not installed.
	direct, nginx, passThrough, defaults *target
	pprofAddr                            string
}

func (b *bench) header(nginxBin string) {
	mode := "smoke run (set IMDS_PROXY_BENCH=1 for the full benchmark)"
	if b.plan.full {
		mode = "full benchmark"
	}
	nginxVersion := errString(b.nginxErr)
	if b.nginxErr == nil {
		out, _ := exec.Command(nginxBin, "-v").CombinedOutput()
		nginxVersion = strings.TrimSpace(strings.TrimPrefix(string(out), "nginx version: "))
	}
	fmt.Printf("\nimds-proxy load benchmark (issue 7): %s\n", mode)
	fmt.Printf("%d CPUs, %s/%s, %s; load generator and IMDS stand-in in the test process, each target a separate process; loopback only\n",
		runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, runtime.Version())
	if b.nginxErr == nil {
		nginxVersion = "nginx: " + nginxVersion
	}
	fmt.Printf("%s\nimds-proxy pass-through: %s; imds-proxy defaults: caching and coalescing on\n\n",
		nginxVersion, strings.Join(passThroughFlags, " "))
}

func (b *bench) targets() []*target {
	var all []*target
	for _, tg := range []*target{b.direct, b.nginx, b.passThrough, b.defaults} {
		if tg != nil {
			all = append(all, tg)
		}
	}
	return all
}

// cell is one measured target at one concurrency.
type cell struct {
	res       loadResult
	cpu       float64 // seconds, -1 when not separable
	peakKiB   int64   // -1 when not separable
	upstream  int64   // requests the stand-in received during the cell
	upConns   int64   // connections it accepted during the cell
	other     float64 // cores busy outside the benchmark during the cell
	peakReset bool
}

// measure runs one load against tg and samples its processes around it.
func (b *bench) measure(tg *target, l load) cell {
	c := cell{cpu: -1, peakKiB: -1}
	var pids []int
	if tg.pids != nil {
		pids = tg.pids()
		c.peakReset = resetPeak(pids)
	}
	var cpu0 float64
	var up0, conns0 int64
	var others otherLoad
	before := l.before
	l.before = func() {
		if before != nil {
			before()
		}
		up0, conns0 = b.up.requests.Load(), b.up.conns.Load()
		if pids != nil {
			cpu0 = cpuSeconds(pids)
		}
		others = startOtherLoad()
	}
	c.res = l.run()
	c.upstream, c.upConns = b.up.requests.Load()-up0, b.up.conns.Load()-conns0
	if pids != nil {
		c.cpu = cpuSeconds(pids) - cpu0
		c.peakKiB = memKiB(pids, "VmHWM")
	}
	c.other = others.cores(c.cpu, c.res.elapsed)
	return c
}

// minSampled is the shortest cell whose CPU figures mean something: /proc
// counts CPU time in 10 ms ticks.
const minSampled = 500 * time.Millisecond

func (c cell) cpuPer10k() string {
	if c.cpu < 0 || c.res.ok == 0 || c.res.elapsed < minSampled {
		return "-"
	}
	return fmt.Sprintf("%.3f", c.cpu/float64(c.res.ok)*10000)
}

func (c cell) otherLoad() string {
	if c.res.elapsed < minSampled {
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

// errorNote is a line for below the table when the cell saw errors.
func (c cell) errorNote(name string) []string {
	if c.res.firstErr == "" {
		return nil
	}
	return []string{fmt.Sprintf("  %s: %s errors, first: %s", name, count(c.res.errs), c.res.firstErr)}
}

// metadataGETs is parts 1-3: GET instance-id with a token from the target,
// at each concurrency, against every target.
func (b *bench) metadataGETs() {
	p := b.plan
	results := map[*target]map[int]cell{}
	var profileNote string
	for _, conc := range p.concurrencies {
		for _, tg := range b.targets() {
			tok, err := fetchToken(tg.addr)
			if err != nil {
				b.t.Fatalf("%s: %v", tg.name, err)
			}
			l := load{addr: tg.addr, method: http.MethodGet, path: metadataGET, header: map[string]string{tokenHeader: tok},
				conc: conc, maxReqs: p.cellReqs, maxTime: p.cellTime, warmup: true}
			var profileDone chan string
			if tg == b.passThrough && b.pprofAddr != "" && conc == p.profileCellConcurrency {
				l.maxTime = max(l.maxTime, 5500*time.Millisecond)
				profileDone = make(chan string, 1)
				l.before = func() { go func() { profileDone <- takeProfile(b.pprofAddr, 5*time.Second) }() }
			}
			c := b.measure(tg, l)
			if profileDone != nil {
				profileNote = <-profileDone
			}
			if results[tg] == nil {
				results[tg] = map[int]cell{}
			}
			results[tg][conc] = c
		}
	}

	fmt.Printf("Parts 1-3. GET %s with the target's own token, keep-alive connection per worker; each cell ≤ %s or %s requests\n",
		metadataGET, p.cellTime, count(p.cellReqs))
	tb := newTable("target", "conc", "requests", "req/s", "vs nginx", "p50", "p99", "CPU s/10k req", "peak RSS MiB",
		"upstream reqs", "upstream conns", "errors", "other load")
	var notes []string
	for _, conc := range p.concurrencies {
		for _, tg := range b.targets() {
			if tg == b.passThrough && b.nginx == nil {
				tb.add("nginx", fmt.Sprint(conc), errString(b.nginxErr))
			}
			c := results[tg][conc]
			vs := "-"
			if b.nginx != nil {
				vs = ratio(c.res.rate(), results[b.nginx][conc].res.rate())
			}
			tb.add(tg.name, fmt.Sprint(conc), count(c.res.ok), rate(c.res.rate()), vs, dur(c.res.p50), dur(c.res.p99),
				c.cpuPer10k(), c.peak(), count(c.upstream), count(c.upConns), count(c.res.errs), c.otherLoad())
			notes = append(notes, c.errorNote(fmt.Sprintf("%s at concurrency %d", tg.name, conc))...)
		}
	}
	tb.print(os.Stdout)
	printNotes(notes)
	fmt.Println("requests: answered 200 in the cell; CPU: utime+stime of the target's processes (nginx: master and workers) per 10,000 of them; " +
		"peak RSS: VmHWM summed over them" + peakNote(results) + "; upstream reqs and conns: what the stand-in received and accepted during the cell; " +
		"CPU and other load: - when the cell was too short for /proc's 10 ms ticks")
	fmt.Println(otherLoadNote)

	// The targets, next to the figures; never asserted.
	var thr, p50s, cached []string
	var maxPeak int64
	for _, conc := range p.concurrencies {
		pt := results[b.passThrough][conc]
		maxPeak = max(maxPeak, pt.peakKiB, results[b.defaults][conc].peakKiB)
		if b.nginx == nil {
			continue
		}
		ng := results[b.nginx][conc]
		thr = append(thr, fmt.Sprintf("c=%d %s", conc, ratio(pt.res.rate(), ng.res.rate())))
		p50s = append(p50s, fmt.Sprintf("c=%d %s vs %s", conc, dur(pt.res.p50), dur(ng.res.p50)))
		cached = append(cached, fmt.Sprintf("c=%d %s", conc, ratio(results[b.defaults][conc].res.rate(), ng.res.rate())))
	}
	noNginx := "n/a (" + errString(b.nginxErr) + ")"
	fmt.Println("issue 7 targets (printed, not asserted):")
	fmt.Printf("  pass-through throughput >= nginx      measured: %s\n", orElse(strings.Join(thr, ", "), noNginx))
	fmt.Printf("  pass-through p50 no worse than nginx  measured: %s\n", orElse(strings.Join(p50s, ", "), noNginx))
	fmt.Printf("  with caching >= 5x nginx throughput   measured: %s\n", orElse(strings.Join(cached, ", "), noNginx))
	fmt.Printf("  peak RSS < 30 MiB under load          measured: %s MiB at most (imds-proxy rows)\n", mib(maxPeak))
	if profileNote != "" {
		fmt.Println(profileNote)
	}
	fmt.Println()
}

func peakNote(results map[*target]map[int]cell) string {
	for _, byConc := range results {
		for _, c := range byConc {
			if c.peakKiB >= 0 && !c.peakReset {
				return " (since the process started: resetting it through clear_refs failed)"
			}
		}
	}
	return " during the cell (reset through clear_refs before it)"
}

// takeProfile fetches a CPU profile from imds-proxy's pprof endpoint and
// saves it under the temp directory, for `go tool pprof -top FILE`.
func takeProfile(addr string, d time.Duration) string {
	client := &http.Client{Timeout: d + 10*time.Second, Transport: &http.Transport{Proxy: nil}}
	resp, err := client.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, int(d.Seconds())))
	if err != nil {
		return "CPU profile of the pass-through cell failed: " + err.Error()
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Sprintf("CPU profile of the pass-through cell failed: status %d", resp.StatusCode)
	}
	path := filepath.Join(os.TempDir(), fmt.Sprintf("imds-proxy-bench-cpu-%d.pprof", time.Now().Unix()))
	f, err := os.Create(path)
	if err != nil {
		return "CPU profile: " + err.Error()
	}
	defer f.Close()
	if _, err := io.Copy(f, io.LimitReader(resp.Body, 64<<20)); err != nil {
		return "CPU profile: " + err.Error()
	}
	return fmt.Sprintf("CPU profile of imds-proxy pass-through at concurrency %d (%s): go tool pprof -top %s", 64, d, path)
}

// tokenPUTs is part 4: PUT /latest/api/token (TTL 21600) at one concurrency,
// minted by imds-proxy itself and forwarded by nginx to the stand-in.
func (b *bench) tokenPUTs() {
	p := b.plan
	fmt.Printf("Part 4. PUT %s (TTL 21600) at concurrency %d; each ≤ %s or %s requests\n", tokenPath, p.putConc, p.putTime, count(p.putReqs))
	tb := newTable("target", "PUTs", "PUTs/s", "p50", "p99", "CPU s/10k PUTs", "peak RSS MiB", "upstream reqs", "errors", "other load")
	var proxyRate float64
	var notes []string
	for _, tg := range []*target{b.passThrough, b.nginx} {
		if tg == nil {
			tb.add("nginx", errString(b.nginxErr))
			continue
		}
		c := b.measure(tg, load{addr: tg.addr, method: http.MethodPut, path: tokenPath, header: map[string]string{ttlHeader: "21600"},
			conc: p.putConc, maxReqs: p.putReqs, maxTime: p.putTime, warmup: true})
		name := tg.name
		if tg == b.passThrough {
			name, proxyRate = "imds-proxy (mints locally)", c.res.rate()
		} else {
			name += " (forwards to the stand-in)"
		}
		tb.add(name, count(c.res.ok), rate(c.res.rate()), dur(c.res.p50), dur(c.res.p99), c.cpuPer10k(), c.peak(),
			count(c.upstream), count(c.res.errs), c.otherLoad())
		notes = append(notes, c.errorNote(name)...)
	}
	tb.print(os.Stdout)
	printNotes(notes)
	fmt.Printf("issue 7 target (printed, not asserted): token PUTs >= 50,000/s on 2 cores   measured: %s/s on %d CPUs\n\n",
		rate(proxyRate), runtime.NumCPU())
}

// mintMemory is part 5: VmRSS of a fresh imds-proxy while it mints a million
// tokens over HTTP (bounded in time; it reports how far it got).
func (b *bench) mintMemory() {
	p := b.plan
	px := startProxy(b.t, b.proxyBin, b.up.URL)
	pid := px.Cmd.Process.Pid
	checkpoints := []int64{p.mints / 4, p.mints / 2, p.mints}
	type sample struct {
		mints  int64
		rssKiB int64
		at     time.Duration
	}
	samples := []sample{{0, memKiB([]int{pid}, "VmRSS"), 0}}
	var mu sync.Mutex
	var t0 time.Time
	var others otherLoad
	var cpu0 float64
	res := load{addr: px.addr, method: http.MethodPut, path: tokenPath, header: map[string]string{ttlHeader: "21600"},
		conc: p.mintConc, maxReqs: p.mints, maxTime: p.mintTime,
		before: func() { t0, others, cpu0 = time.Now(), startOtherLoad(), cpuSeconds([]int{pid}) },
		onOK: func(n int64) {
			if !slices.Contains(checkpoints, n) {
				return
			}
			s := sample{n, memKiB([]int{pid}, "VmRSS"), time.Since(t0)}
			mu.Lock()
			samples = append(samples, s)
			mu.Unlock()
		}}.run()
	mu.Lock()
	defer mu.Unlock()
	slices.SortFunc(samples, func(a, b sample) int { return int(a.mints - b.mints) })
	if res.ok < p.mints {
		samples = append(samples, sample{res.ok, memKiB([]int{pid}, "VmRSS"), res.elapsed})
	}

	fmt.Printf("Part 5. Memory of a fresh imds-proxy minting %s tokens over HTTP (PUT, TTL 21600, concurrency %d; ≤ %s)\n",
		count(p.mints), p.mintConc, p.mintTime)
	tb := newTable("tokens minted", "VmRSS MiB", "elapsed", "mints/s so far")
	for _, s := range samples {
		r := "-"
		if s.at > 0 {
			r = rate(float64(s.mints) / s.at.Seconds())
		}
		tb.add(count(s.mints), mib(s.rssKiB), dur(s.at), r)
	}
	tb.print(os.Stdout)
	reached := fmt.Sprintf("reached %s", count(res.ok))
	if res.ok < p.mints {
		reached = fmt.Sprintf("stopped at %s of %s (time limit)", count(res.ok), count(p.mints))
	}
	other := cell{res: res, other: others.cores(cpuSeconds([]int{pid})-cpu0, res.elapsed)}.otherLoad()
	fmt.Printf("%s; peak RSS (VmHWM) %s MiB; errors %s; other load %s cores\n", reached, mib(memKiB([]int{pid}, "VmHWM")),
		count(res.errs), other)
	printNotes(cell{res: res}.errorNote("minting"))
	var rss, at []string
	for _, s := range samples {
		rss, at = append(rss, mib(s.rssKiB)), append(at, count(s.mints))
	}
	fmt.Printf("issue 7 target (printed, not asserted): memory flat after 1M mints   measured: VmRSS %s MiB after %s mints\n\n",
		strings.Join(rss, " -> "), strings.Join(at, ", "))
}

// credentialsEconomy is part 6: a burst of AWS SDK for Go v2 credential
// fetches, every one with its own IMDS client, against
// amazon-ec2-metadata-mock directly and through one imds-proxy (defaults),
// counting what reaches the mock with a tap in front of it.
func (b *bench) credentialsEconomy() {
	p := b.plan
	fmt.Printf("Part 6. %s concurrent AWS SDK for Go v2 credential fetches (ec2rolecreds, each with its own imds.New client) "+
		"against amazon-ec2-metadata-mock, a fresh one per setup\n", count(int64(p.credFetches)))
	tb := newTable("setup", "fetched", "errors", "wall", "p50", "p99", "upstream PUT", "upstream GET", "upstream total")
	var viaProxy int
	var notes []string
	for _, viaImdsProxy := range []bool{false, true} {
		tap := startCountedAEMM(b.t)
		name, endpoint := "direct to the mock", tap.URL()
		if viaImdsProxy {
			name, endpoint = "through one imds-proxy (defaults)", "http://"+startProxy(b.t, b.proxyBin, tap.URL()).addr
		}
		before := len(tap.Requests()) // the proxy's own session token PUT
		r := credentialBurst(endpoint, p.credFetches)
		var puts, gets int
		for _, req := range tap.Requests()[before:] {
			if req.Method == http.MethodPut {
				puts++
			} else {
				gets++
			}
		}
		if viaImdsProxy {
			viaProxy = puts + gets
		}
		if r.firstErr != "" {
			notes = append(notes, fmt.Sprintf("  %s, first error: %s", name, r.firstErr))
		}
		tb.add(name, count(r.ok), count(r.errs), dur(r.wall), dur(r.p50), dur(r.p99),
			count(int64(puts)), count(int64(gets)), count(int64(puts+gets)))
	}
	tb.print(os.Stdout)
	printNotes(notes)
	fmt.Println("upstream: requests that reached the mock during the burst (the proxy's own session token, fetched at start, not counted); " +
		"a token PUT is serialised in front of the mock, which crashes under concurrent ones (see aemm_test.go)")
	fmt.Printf("issue 7 target (printed, not asserted): <= 5 upstream requests for 1,000 credential fetches through the proxy "+
		"(about 2,000 without)   measured: %s through the proxy for %s fetches\n\n", count(int64(viaProxy)), count(int64(p.credFetches)))
}

const otherLoadNote = "other load: cores busy outside the benchmark during the cell (machine user+system time less the test " +
	"process's and the target's); above ~0.1 something else on the machine disturbed the figures"

func printNotes(notes []string) {
	for _, n := range notes {
		fmt.Println(n)
	}
}

type burstResult struct {
	ok, errs       int64
	wall, p50, p99 time.Duration
	firstErr       string
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
		times    []time.Duration
		r        burstResult
		ok, errs atomic.Int64
	)
	for i := 0; i < n; i++ {
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
				err = fmt.Errorf("empty credentials")
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
			times = append(times, d)
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	r.wall = time.Since(t0)
	r.ok, r.errs = ok.Load(), errs.Load()
	if len(times) > 0 {
		slices.Sort(times)
		r.p50, r.p99 = times[len(times)/2], times[len(times)*99/100]
	}
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
