package serving

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// events records what happened, in order, from any goroutine.
type events struct {
	mu   sync.Mutex
	list []string
}

func (e *events) add(event string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.list = append(e.list, event)
}

func (e *events) get() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.list)
}

// blockingServer serves /quick at once and holds /slow until release is
// closed, saying on inFlight when it has one.
func blockingServer(record *events, inFlight chan<- struct{}, release <-chan struct{}) *http.Server {
	return &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			inFlight <- struct{}{}
			<-release
			record.add("slow request answered")
		}
		_, _ = io.WriteString(w, "ok")
	})}
}

// idleConn is a keep-alive connection that has had its one answer.
func idleConn(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := bufio.NewReader(c)
	if _, err := io.WriteString(c, "GET /quick HTTP/1.1\r\nHost: proxy\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return c, r
}

// closedByServer says whether the server has closed c: a read ends in EOF.
func closedByServer(c net.Conn, r *bufio.Reader) bool {
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	_, err := r.Peek(1)
	return errors.Is(err, io.EOF)
}

// TestRunShutsDownInOrder: on cancellation Run stops the reconcile loop
// first, then lets the request in flight finish and closes the idle
// keep-alive connection, and runs the cleanup (the proxy's rule removal)
// only after both, so that NAT still translates what the clients see.
func TestRunShutsDownInOrder(t *testing.T) {
	record := &events{}
	inFlight, release := make(chan struct{}), make(chan struct{})
	s := &Set{}
	if err := s.Listen("tcp", "127.0.0.1:0", blockingServer(record, inFlight, release), nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	// The idle connection is opened once Run serves, and read in Cleanup
	// after cancel.
	var idleClosed bool
	var c net.Conn
	var cr *bufio.Reader
	done := make(chan error, 1)
	go func() {
		done <- s.Run(ctx, Lifecycle{
			Reconcile: func(ctx context.Context) { <-ctx.Done(); record.add("reconcile stopped") },
			Timeout:   10 * time.Second,
			Cleanup:   func() { idleClosed = closedByServer(c, cr); record.add("cleanup") },
		}, zap.NewNop())
	}()
	c, cr = idleConn(t, s.Addr(0))
	answered := make(chan error, 1)
	go func() {
		resp, err := http.Get("http://" + s.Addr(0) + "/slow")
		if err == nil {
			resp.Body.Close()
		}
		answered <- err
	}()
	<-inFlight
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for !slices.Contains(record.get(), "reconcile stopped") && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // time enough to clean up too early
	close(release)
	if err := <-answered; err != nil {
		t.Errorf("the request in flight: %v", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
	if want := []string{"reconcile stopped", "slow request answered", "cleanup"}; !slices.Equal(record.get(), want) {
		t.Errorf("order %q; want %q", record.get(), want)
	}
	if !idleClosed {
		t.Error("the idle keep-alive connection was still open when cleanup ran")
	}
}

// TestRunClosesWhatIsLeftAfterTimeout: a request still in flight after the
// timeout has its connection closed before the cleanup runs, and Run says
// the shutdown timed out.
func TestRunClosesWhatIsLeftAfterTimeout(t *testing.T) {
	record := &events{}
	inFlight, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	s := &Set{}
	if err := s.Listen("tcp", "127.0.0.1:0", blockingServer(record, inFlight, release), nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var slowClosed bool
	var c net.Conn
	var cr *bufio.Reader
	done := make(chan error, 1)
	go func() {
		done <- s.Run(ctx, Lifecycle{Timeout: 100 * time.Millisecond,
			Cleanup: func() { slowClosed = closedByServer(c, cr); record.add("cleanup") }}, zap.NewNop())
	}()
	var err error
	if c, err = net.Dial("tcp", s.Addr(0)); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cr = bufio.NewReader(c)
	if _, err := io.WriteString(c, "GET /slow HTTP/1.1\r\nHost: proxy\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	<-inFlight
	cancel()
	if err := <-done; err == nil || !strings.Contains(err.Error(), "shutting down: context deadline exceeded") {
		t.Errorf("Run: %v; want the shutdown timed out", err)
	}
	if !slowClosed || !slices.Equal(record.get(), []string{"cleanup"}) {
		t.Errorf("closed before cleanup: %t, events %q; want the connection closed before cleanup", slowClosed, record.get())
	}
}

// failingListener fails its first Accept.
type failingListener struct{ net.Listener }

func (failingListener) Accept() (net.Conn, error) { return nil, errors.New("accept failed") }

// TestRunShutsDownWhenAServerFails: a server that fails ends Run with its
// error, after the same ordered shutdown of the others.
func TestRunShutsDownWhenAServerFails(t *testing.T) {
	record := &events{}
	s := &Set{}
	ok := &http.Server{Handler: http.NotFoundHandler()}
	if err := s.Listen("tcp", "127.0.0.1:0", ok, nil); err != nil {
		t.Fatal(err)
	}
	failing := &http.Server{Handler: http.NotFoundHandler()}
	if err := s.Listen("tcp", "127.0.0.1:0", failing, func(ln net.Listener) net.Listener { return failingListener{ln} }); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err := s.Run(context.Background(), Lifecycle{
		Reconcile: func(ctx context.Context) { <-ctx.Done(); record.add("reconcile stopped") },
		Timeout:   time.Second,
		Cleanup:   func() { record.add("cleanup") },
	}, zap.NewNop())
	if err == nil || !strings.Contains(err.Error(), "serving "+s.Addr(1)+": accept failed") {
		t.Errorf("Run: %v; want the failed server named", err)
	}
	if want := []string{"reconcile stopped", "cleanup"}; !slices.Equal(record.get(), want) {
		t.Errorf("order %q; want %q", record.get(), want)
	}
	if _, err := http.Get("http://" + s.Addr(0) + "/"); err == nil {
		t.Error("the healthy server still serves after Run")
	}
}

// TestAdminListener: the admin listener is optional, and its address is
// the one bound.
func TestAdminListener(t *testing.T) {
	s := &Set{}
	if err := s.ListenAdmin("", http.NotFoundHandler(), zap.NewNop()); err != nil || s.AdminAddr() != "" {
		t.Errorf("no admin address: %v, %q", err, s.AdminAddr())
	}
	if err := s.Listen("tcp", "127.0.0.1:0", &http.Server{}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.ListenAdmin("127.0.0.1:0", http.NotFoundHandler(), zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.AdminAddr() != s.Addr(1) || s.AdminAddr() == s.Addr(0) {
		t.Errorf("admin at %q, listeners at %q and %q", s.AdminAddr(), s.Addr(0), s.Addr(1))
	}
	if err := s.ListenAdmin(s.Addr(0), http.NotFoundHandler(), zap.NewNop()); err == nil || !strings.HasPrefix(err.Error(), "--metrics-listen "+s.Addr(0)+": ") {
		t.Errorf("an address in use: %v; want the flag named", err)
	}
}

// TestOneServerOnTwoListeners: a server that serves two listeners, as the
// proxy's does on 127.0.0.1 and [::1], serves plain HTTP on both.
func TestOneServerOnTwoListeners(t *testing.T) {
	s := &Set{}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })}
	for range 2 {
		if err := s.Listen("tcp", "127.0.0.1:0", srv, nil); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, Lifecycle{Timeout: time.Second}, zap.NewNop()) }()
	client := &http.Client{Timeout: 5 * time.Second}
	for i := range 2 {
		resp, err := client.Get("http://" + s.Addr(i) + "/")
		if err != nil {
			t.Errorf("listener %d: %v", i, err)
			continue
		}
		resp.Body.Close()
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}
