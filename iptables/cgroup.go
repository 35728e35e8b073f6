package iptables

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// initCgroupNamespace is the fixed name of the host's (initial) cgroup
// namespace (PROC_CGROUP_INIT_INO in the kernel).
const initCgroupNamespace = "cgroup:[4026531835]"

// OwnCgroup returns the proxy's cgroup v2 path as an iptables cgroup match
// (--path) installed by the proxy resolves it, or why the cgroup exemption
// cannot be used here.
//
// An app container cannot forge this exemption with the runtime's default
// capabilities: it would have to move into the proxy's cgroup, and the
// runtime gives it a cgroup and cgroup namespace of its own with cgroupfs
// read-only. A socket mark (NET_RAW suffices since Linux 5.17) and a UID
// (CAP_SETUID) are both within a default container's reach.
func OwnCgroup() (string, error) {
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", fmt.Errorf("reading the proxy's cgroup: %w", err)
	}
	path, ok := "", false
	for _, line := range strings.Split(string(self), "\n") {
		if p, found := strings.CutPrefix(line, "0::"); found {
			path, ok = p, true
		}
	}
	if !ok || path == "" {
		return "", errors.New("no cgroup v2 hierarchy: the iptables cgroup match needs one")
	}
	ns, err := os.Readlink("/proc/self/ns/cgroup")
	if err != nil {
		return "", fmt.Errorf("reading the proxy's cgroup namespace: %w", err)
	}
	if ns == initCgroupNamespace {
		if path == "/" {
			return "", errors.New("the proxy runs in the root cgroup, and every process descends from it: " +
				"run it in a container (a cgroup) of its own")
		}
		return path, nil // an absolute path, which every kernel resolves alike
	}
	// In a cgroup namespace the path is relative to the namespace's root.
	if major, minor, release := kernelVersion(); major < 6 || major == 6 && minor < 1 {
		return "", fmt.Errorf("Linux %s resolves iptables cgroup paths from the host's cgroup root, not from the proxy's "+
			"cgroup namespace (Linux 6.1 and later do), so the proxy cannot name its own cgroup", release)
	}
	return path, nil
}

// kernelVersion is the running kernel's major and minor version, and its
// release string.
func kernelVersion() (major, minor int, release string) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return 0, 0, "(unknown)"
	}
	release = unix.ByteSliceToString(u.Release[:])
	parts := strings.SplitN(release, ".", 3)
	if len(parts) >= 2 {
		major, _ = strconv.Atoi(parts[0])
		minor, _ = strconv.Atoi(strings.TrimFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' }))
	}
	return major, minor, release
}

// InstalledExemption says how the sidecar chain installed here exempts the
// proxy's own traffic ("cgroup", "mark", "uid", several joined by "+"),
// and "" without a sidecar chain. It needs NET_ADMIN or root.
func InstalledExemption() (string, error) {
	lines, err := installedChain(ChainOutput)
	if err != nil {
		return "", err
	}
	var kinds []string
	for _, line := range lines {
		switch {
		case !strings.Contains(line, "-j RETURN"):
		case strings.Contains(line, "-m cgroup"):
			kinds = append(kinds, "cgroup")
		case strings.Contains(line, "-m mark"):
			kinds = append(kinds, "mark")
		case strings.Contains(line, "--uid-owner"):
			kinds = append(kinds, "uid")
		}
	}
	return strings.Join(kinds, "+"), nil
}
