package testutil

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Process is a running imds-proxy serving command.
type Process struct {
	Cmd *exec.Cmd
	// API and Metrics are the base URLs it logged as serving on.
	API, Metrics string
	Logs         *LineLog
	// Done receives the exit error once.
	Done chan error
	// exited is closed when the process has exited.
	exited chan struct{}
}

// StartProcess starts cmd, an imds-proxy serving command, kills it when the
// test ends, and waits for its "serving" log line.
func StartProcess(t testing.TB, cmd *exec.Cmd) *Process {
	t.Helper()
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &Process{Cmd: cmd, Logs: newLineLog(stderr), Done: make(chan error, 1), exited: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		close(p.exited)
		p.Done <- err
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.Logs.closed
	})
	serving, err := p.Logs.WaitFor(`"msg":"serving"`, 10*time.Second)
	if err != nil {
		t.Fatalf("imds-proxy did not start: %v\n%s", err, p.Logs.String())
	}
	var line struct {
		Listen        string `json:"listen"`
		MetricsListen string `json:"metrics_listen"`
	}
	if err := json.Unmarshal([]byte(serving), &line); err != nil {
		t.Fatal(err)
	}
	p.API, p.Metrics = "http://"+line.Listen, "http://"+line.MetricsListen
	return p
}

// Terminate sends SIGTERM and expects a clean exit.
func (p *Process) Terminate(t testing.TB) {
	t.Helper()
	if err := p.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-p.Done; err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, p.Logs.String())
	}
}

// WaitExit waits up to timeout for the process to exit, and returns its
// exit error; still running then fails the test.
func (p *Process) WaitExit(t testing.TB, timeout time.Duration) error {
	t.Helper()
	select {
	case err := <-p.Done:
		return err
	case <-time.After(timeout):
		t.Fatalf("imds-proxy did not exit within %s\n%s", timeout, p.Logs.String())
		return nil
	}
}

// maxKeptLog bounds what a LineLog keeps, so that a proxy logging under a
// benchmark's load cannot fill the test process's memory.
const maxKeptLog = 8 << 20

// LineLog collects a process's log lines (the first maxKeptLog bytes of
// them) and lets a test wait for one.
type LineLog struct {
	lines  chan string
	closed chan struct{}
	mu     sync.Mutex
	all    strings.Builder
}

func newLineLog(r io.Reader) *LineLog {
	l := &LineLog{lines: make(chan string, 4096), closed: make(chan struct{})}
	go func() {
		defer close(l.closed)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			l.mu.Lock()
			if l.all.Len() < maxKeptLog {
				l.all.WriteString(sc.Text() + "\n")
			}
			l.mu.Unlock()
			select {
			case l.lines <- sc.Text():
			default: // nobody is waiting for lines this far on
			}
		}
	}()
	return l
}

// WaitFor waits for the next log line containing substr.
func (l *LineLog) WaitFor(substr string, timeout time.Duration) (string, error) {
	deadline := time.After(timeout)
	for {
		select {
		case line := <-l.lines:
			if strings.Contains(line, substr) {
				return line, nil
			}
		case <-deadline:
			return "", fmt.Errorf("no log line with %q within %s", substr, timeout)
		}
	}
}

// String returns everything logged so far.
func (l *LineLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.all.String()
}
