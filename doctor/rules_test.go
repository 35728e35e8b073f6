package doctor

import (
	"errors"
	"testing"
)

// TestDescribeRules: what doctor says about the redirect rules here, for
// each answer of the iptables readers, reading only what the answer needs.
func TestDescribeRules(t *testing.T) {
	unreadable := errors.New("iptables: permission denied")
	uncovered := errors.New("IPv6 IMDS is routed and not redirected")
	for _, c := range []struct {
		name       string
		present    bool
		presentErr error
		ipv6Err    error
		exemption  string
		want       string
		reads      int
	}{
		{"unreadable", false, unreadable, nil, "", "unknown (iptables: permission denied)", 1},
		{"absent", false, nil, nil, "", "absent", 1},
		{"IPv4 only", true, nil, uncovered, "mark", "present for IPv4 only: IPv6 IMDS is routed and not redirected", 2},
		{"node rules", true, nil, nil, "", "present", 3},
		{"cgroup", true, nil, nil, "cgroup", "present, exempting the proxy's own cgroup", 3},
		{"mark", true, nil, nil, "mark", "present, exempting the proxy by mark: an app container with NET_RAW or CAP_SETUID " +
			"(Docker and containerd defaults) can forge that and bypass the proxy", 3},
		{"uid", true, nil, nil, "uid", "present, exempting the proxy by uid: an app container with NET_RAW or CAP_SETUID " +
			"(Docker and containerd defaults) can forge that and bypass the proxy", 3},
		{"cgroup and mark", true, nil, nil, "cgroup+mark", "present, exempting the proxy by cgroup+mark: an app container with " +
			"NET_RAW or CAP_SETUID (Docker and containerd defaults) can forge that and bypass the proxy", 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			reads := 0
			got := describeRules(
				func() (bool, error) { reads++; return c.present, c.presentErr },
				func() error { reads++; return c.ipv6Err },
				func() (string, error) { reads++; return c.exemption, nil })
			if got != c.want || reads != c.reads {
				t.Errorf("%q after %d reads; want %q after %d", got, reads, c.want, c.reads)
			}
		})
	}
}
