// Package attribution tells which process is behind a TCP connection, from
// a proc filesystem: the socket's owner UID, and where the proxy can see
// the caller's PID namespace, the process, its executable, its cgroup and
// the container that cgroup names. A sidecar finds the socket in its own
// network namespace; a node agent, which sees the host's processes, finds
// the namespace the connection came from first (Callers).
// It reads only; callers bound what it returns before logging it.
package attribution

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Process is what can be told about the process behind a connection: the
// socket's UID when the caller shares the reader's network namespace
// (sidecar), and the process itself when its PID namespace is visible too.
type Process struct {
	UID        *int   `json:"uid,omitempty"`
	PID        int    `json:"pid,omitempty"`
	Command    string `json:"command,omitempty"`
	Executable string `json:"executable,omitempty"`
	Cgroup     string `json:"cgroup,omitempty"`
	Container
}

// Attributor looks callers up in a proc filesystem.
type Attributor struct {
	// Proc is where the proc filesystem is mounted. If empty, /proc.
	Proc string
}

// Lookup finds the TCP socket whose local address is client (the caller's
// end of the connection) in the reader's own network namespace, and the
// process holding it. It scans the socket tables and every process's
// descriptors, so callers bound how often they ask.
func (a Attributor) Lookup(client netip.AddrPort) Process {
	uid, inode, ok := a.socket(a.root(), client)
	if !ok {
		return Process{}
	}
	return a.process(uid, inode, nil)
}

// LookupIn is Lookup in the network namespace of ns: the socket is looked
// for in that namespace's tables, and its holder among its processes.
func (a Attributor) LookupIn(ns Namespace, client netip.AddrPort) Process {
	uid, inode, ok := a.socket(filepath.Join(a.root(), strconv.Itoa(ns.pids[0])), client)
	if !ok {
		return Process{}
	}
	return a.process(uid, inode, ns.pids)
}

// process is the holder of the socket inode, among pids (nil: all).
func (a Attributor) process(uid int, inode uint64, pids []int) Process {
	p := Process{UID: &uid}
	if pid, ok := a.holder(inode, pids); ok {
		p.PID = pid
		p.Command = a.read(pid, "comm")
		p.Executable, _ = os.Readlink(filepath.Join(a.root(), strconv.Itoa(pid), "exe"))
		p.Cgroup = a.read(pid, "cgroup")
		p.Container = ParseCgroup(p.Cgroup)
	}
	return p
}

func (a Attributor) root() string {
	if a.Proc == "" {
		return "/proc"
	}
	return a.Proc
}

func (a Attributor) read(pid int, name string) string {
	b, err := os.ReadFile(filepath.Join(a.root(), strconv.Itoa(pid), name))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// socket scans dir's net/tcp and net/tcp6 (dir is /proc for the reader's
// network namespace, /proc/<pid> for that process's) for the socket bound
// to client.
func (a Attributor) socket(dir string, client netip.AddrPort) (uid int, inode uint64, ok bool) {
	want := procNetAddr(client)
	for _, table := range []string{"net/tcp", "net/tcp6"} {
		f, err := os.Open(filepath.Join(dir, table))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || !strings.EqualFold(fields[1], want[table]) {
				continue
			}
			u, err1 := strconv.Atoi(fields[7])
			n, err2 := strconv.ParseUint(fields[9], 10, 64)
			if err1 == nil && err2 == nil && n != 0 {
				f.Close()
				return u, n, true
			}
		}
		f.Close()
	}
	return 0, 0, false
}

// procNetAddr spells addr as /proc/net/tcp and tcp6 do: each 32-bit word of
// the address in host (little-endian) byte order, then the port, in hex.
func procNetAddr(addr netip.AddrPort) map[string]string {
	port := fmt.Sprintf(":%04X", addr.Port())
	out := map[string]string{}
	ip := addr.Addr().Unmap()
	if ip.Is4() {
		b := ip.As4()
		out["net/tcp"] = strings.ToUpper(hex.EncodeToString([]byte{b[3], b[2], b[1], b[0]})) + port
		mapped := netip.AddrFrom16(ip.As16())
		out["net/tcp6"] = words(mapped.As16()) + port
		return out
	}
	out["net/tcp6"] = words(ip.As16()) + port
	return out
}

func words(b [16]byte) string {
	var s strings.Builder
	for i := 0; i < 16; i += 4 {
		s.WriteString(strings.ToUpper(hex.EncodeToString([]byte{b[i+3], b[i+2], b[i+1], b[i]})))
	}
	return s.String()
}

// holder finds the process with a descriptor on the socket inode, among
// pids (nil: every process). It reads at most maxScannedFDs descriptors, so
// a crowded namespace bounds its cost.
func (a Attributor) holder(inode uint64, pids []int) (int, bool) {
	const maxScannedFDs = 20000
	target := "socket:[" + strconv.FormatUint(inode, 10) + "]"
	if pids == nil {
		pids = a.pids()
	}
	scanned := 0
	for _, pid := range pids {
		fdDir := filepath.Join(a.root(), strconv.Itoa(pid), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if scanned++; scanned > maxScannedFDs {
				return 0, false
			}
			if link, err := os.Readlink(filepath.Join(fdDir, fd.Name())); err == nil && link == target {
				return pid, true
			}
		}
	}
	return 0, false
}

// pids lists the processes of the proc filesystem.
func (a Attributor) pids() []int {
	entries, err := os.ReadDir(a.root())
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// CanTrace says why the reader cannot see which network namespace other
// processes are in, if it cannot: reading another process's namespace and
// descriptor links needs ptrace access to it, which a process without
// CAP_SYS_PTRACE has only to processes of its own UID whose capabilities
// it holds too (and containers' processes hold some an agent does not).
func (a Attributor) CanTrace() error {
	status, err := os.ReadFile(filepath.Join(a.root(), "self", "status"))
	if err != nil {
		return fmt.Errorf("reading its own capabilities: %w", err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if hexCaps, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(hexCaps), 16, 64)
			if err != nil {
				return fmt.Errorf("reading its own capabilities: %w", err)
			}
			if caps&(1<<capSysPtrace) == 0 {
				return errors.New("the process lacks CAP_SYS_PTRACE")
			}
			return nil
		}
	}
	return errors.New("reading its own capabilities: no CapEff line")
}

// capSysPtrace is CAP_SYS_PTRACE's bit (linux/capability.h).
const capSysPtrace = 19

// Namespace is one network namespace and the processes in it.
type Namespace struct {
	// ID is the namespace's inode: the same as long as the namespace lives.
	ID   uint64
	pids []int
}

// Namespaces lists the network namespaces that have processes in them,
// with those processes. It reads one link per process.
func (a Attributor) Namespaces() []Namespace {
	byID := map[uint64]*Namespace{}
	var order []uint64
	for _, pid := range a.pids() {
		link, err := os.Readlink(filepath.Join(a.root(), strconv.Itoa(pid), "ns", "net"))
		if err != nil {
			continue
		}
		id, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "net:["), "]"), 10, 64)
		if err != nil {
			continue
		}
		ns := byID[id]
		if ns == nil {
			ns = &Namespace{ID: id}
			byID[id] = ns
			order = append(order, id)
		}
		ns.pids = append(ns.pids, pid)
	}
	out := make([]Namespace, 0, len(order))
	for _, id := range order {
		out = append(out, *byID[id])
	}
	return out
}

// FindNamespace finds the network namespace whose socket tables hold a
// socket bound to client, reading each namespace's tables once.
func (a Attributor) FindNamespace(client netip.AddrPort) (Namespace, bool) {
	for _, ns := range a.Namespaces() {
		if _, _, ok := a.socket(filepath.Join(a.root(), strconv.Itoa(ns.pids[0])), client); ok {
			return ns, true
		}
	}
	return Namespace{}, false
}
