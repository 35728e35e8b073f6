package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// load is one bounded measurement: conc workers, each on its own keep-alive
// connection, send the same request until maxReqs attempts were made or
// maxTime has passed, whichever comes first.
type load struct {
	addr    string // 127.0.0.1:PORT
	method  string // GET or PUT
	path    string
	header  map[string]string
	conc    int
	maxReqs int64
	maxTime time.Duration
	// warmup: before the clock starts, each worker connects and sends one
	// request, so connection setup is not measured.
	warmup bool
	// before runs once all workers are ready, just before the clock starts;
	// after each successful request, onOK gets the running count.
	before func()
	onOK   func(n int64)
}

// loadResult is what one measurement saw.
type loadResult struct {
	ok, errs int64
	elapsed  time.Duration
	p50, p99 time.Duration
	firstErr string
}

func (r loadResult) rate() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.ok) / r.elapsed.Seconds()
}

// run performs the measurement. Every socket gets a hard deadline past
// maxTime, so a stuck target cannot hold it up.
func (l load) run() loadResult {
	var (
		attempts, ok, errs atomic.Int64
		ready, done        sync.WaitGroup
		start              = make(chan struct{})
		end                time.Time // written before start is closed
		lat                = make([][]time.Duration, l.conc)
		errMu              sync.Mutex
		firstErr           string
	)
	hard := time.Now().Add(l.maxTime + 30*time.Second) // covers warm-up too
	req := l.request()
	noteErr := func(err error) {
		errs.Add(1)
		errMu.Lock()
		if firstErr == "" {
			firstErr = err.Error()
		}
		errMu.Unlock()
	}
	for w := 0; w < l.conc; w++ {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			c := &rawClient{addr: l.addr, req: req, deadline: hard}
			defer c.close()
			if l.warmup {
				if _, err := c.do(); err != nil {
					noteErr(fmt.Errorf("warm-up: %w", err))
				}
			}
			ready.Done()
			<-start
			mine := make([]time.Duration, 0, min(l.maxReqs/int64(l.conc)+1, 1<<16))
			for attempts.Add(1) <= l.maxReqs {
				t0 := time.Now()
				if t0.After(end) {
					break
				}
				status, err := c.do()
				if err == nil && status != http.StatusOK {
					err = fmt.Errorf("%s %s: status %d", l.method, l.path, status)
				}
				if err != nil {
					noteErr(err)
					continue
				}
				mine = append(mine, time.Since(t0))
				n := ok.Add(1)
				if l.onOK != nil {
					l.onOK(n)
				}
			}
			lat[w] = mine
		}()
	}
	ready.Wait()
	errs.Store(0) // warm-up errors are reported through firstErr only
	if l.before != nil {
		l.before()
	}
	t0 := time.Now()
	end = t0.Add(l.maxTime)
	close(start)
	done.Wait()
	res := loadResult{ok: ok.Load(), errs: errs.Load(), elapsed: time.Since(t0), firstErr: firstErr}
	all := slices.Concat(lat...)
	slices.Sort(all)
	if len(all) > 0 {
		res.p50 = all[len(all)/2]
		res.p99 = all[min(len(all)-1, len(all)*99/100)]
	}
	return res
}

func (l load) request() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: imds-proxy-bench\r\n", l.method, l.path, l.addr)
	for k, v := range l.header {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v)
	}
	if l.method == http.MethodPut {
		b.WriteString("Content-Length: 0\r\n")
	}
	b.WriteString("\r\n")
	return b.Bytes()
}

// rawClient is one keep-alive HTTP/1.1 connection that sends a fixed request
// and reads just enough of the response to find its status and end: the load
// generator's own cost stays small next to the target's. It reconnects when
// the server closes the connection (nginx does after keepalive_requests).
type rawClient struct {
	addr     string
	req      []byte
	deadline time.Time
	conn     net.Conn
	br       *bufio.Reader
}

func (c *rawClient) do() (int, error) {
	if c.conn == nil {
		conn, err := net.DialTimeout("tcp", c.addr, 5*time.Second)
		if err != nil {
			return 0, err
		}
		_ = conn.SetDeadline(c.deadline)
		c.conn = conn
		if c.br == nil {
			c.br = bufio.NewReaderSize(conn, 4096)
		} else {
			c.br.Reset(conn)
		}
	}
	if _, err := c.conn.Write(c.req); err != nil {
		c.close()
		return 0, err
	}
	status, keep, err := readResponse(c.br)
	if err != nil || !keep {
		c.close()
	}
	return status, err
}

func (c *rawClient) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

var errMalformed = errors.New("malformed HTTP response")

// readResponse reads one response, discarding its body, and reports its
// status and whether the connection stays open.
func readResponse(br *bufio.Reader) (status int, keepAlive bool, err error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return 0, false, err
	}
	// "HTTP/1.1 200 OK\r\n"
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, false, errMalformed
	}
	status, err = strconv.Atoi(string(line[9:12]))
	if err != nil {
		return 0, false, errMalformed
	}
	keepAlive = line[7] == '1'
	length, chunked := int64(-1), false
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return 0, false, err
		}
		if len(line) <= 2 {
			break
		}
		colon := bytes.IndexByte(line, ':')
		if colon < 0 {
			return 0, false, errMalformed
		}
		name, value := line[:colon], strings.TrimSpace(string(line[colon+1:]))
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.ParseInt(value, 10, 64); err != nil {
				return 0, false, errMalformed
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			chunked = strings.EqualFold(value, "chunked")
		case bytes.EqualFold(name, []byte("Connection")):
			keepAlive = !strings.EqualFold(value, "close")
		}
	}
	switch {
	case chunked:
		err = discardChunked(br)
	case length >= 0:
		_, err = br.Discard(int(length))
	case status == http.StatusNoContent || status == http.StatusNotModified:
	default: // body up to EOF
		_, err = io.Copy(io.Discard, br)
		keepAlive = false
	}
	return status, keepAlive && err == nil, err
}

func discardChunked(br *bufio.Reader) error {
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return err
		}
		sizeText := strings.TrimSpace(string(line))
		if i := strings.IndexByte(sizeText, ';'); i >= 0 {
			sizeText = sizeText[:i]
		}
		size, err := strconv.ParseInt(sizeText, 16, 64)
		if err != nil {
			return errMalformed
		}
		if size == 0 {
			for { // trailers, then the empty line
				line, err := br.ReadSlice('\n')
				if err != nil {
					return err
				}
				if len(line) <= 2 {
					return nil
				}
			}
		}
		if _, err := br.Discard(int(size) + 2); err != nil {
			return err
		}
	}
}

// fetchToken asks addr for an IMDSv2 token, as a client of that target would.
func fetchToken(addr string) (string, error) {
	req, err := http.NewRequest(http.MethodPut, "http://"+addr+imdsapi.TokenPath, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set(imdsapi.TokenTTLHeader, "21600")
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}
	defer client.CloseIdleConnections()
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get(imdsapi.TokenTTLHeader) != "21600" {
		return "", fmt.Errorf("token PUT to %s: status %d, TTL header %q", addr, resp.StatusCode, resp.Header.Get(imdsapi.TokenTTLHeader))
	}
	return string(body), nil
}
