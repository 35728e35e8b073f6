package iptables

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// TestExemptionWithOwnCgroup: a sidecar that installs its own redirect
// exempts its own cgroup when wanted and usable, and otherwise falls back
// to the mark or UID with a warning that says why.
func TestExemptionWithOwnCgroup(t *testing.T) {
	found := func() (string, error) { return "/kubepods/pod1/proxy", nil }
	unusable := func() (string, error) { return "", errors.New("no cgroup v2 hierarchy") }
	for _, c := range []struct {
		name   string
		e      Exemption
		want   bool
		own    func() (string, error)
		cgroup string
		log    string
	}{
		{"sidecar, cgroup usable", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true}, true, found,
			"/kubepods/pod1/proxy", "the redirect exempts the proxy's own cgroup"},
		{"sidecar, cgroup unusable", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true}, true, unusable,
			"", "error=no cgroup v2 hierarchy reason=the cgroup exemption is unavailable"},
		{"sidecar, --exempt-cgroup off", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true}, false, found,
			"", "reason=--exempt-cgroup off"},
		{"sidecar without its own rules", Exemption{Mode: imdsapi.ModeSidecar}, true, found, "", ""},
		{"node", Exemption{Mode: imdsapi.ModeNode, Redirects: true}, true, found, "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.InfoLevel)
			got := c.e.WithOwnCgroup(c.want, c.own, zap.New(core))
			var logged []string
			for _, entry := range logs.All() {
				line := entry.Message
				fields := entry.ContextMap()
				for _, k := range slices.Sorted(maps.Keys(fields)) {
					line += " " + k + "=" + fields[k].(string)
				}
				logged = append(logged, line)
			}
			if got.Cgroup != c.cgroup || (c.log == "") != (len(logged) == 0) || c.log != "" && !strings.Contains(strings.Join(logged, "\n"), c.log) {
				t.Errorf("cgroup %q, logged %q; want cgroup %q, logging %q", got.Cgroup, logged, c.cgroup, c.log)
			}
		})
	}
}

// TestExemptionChoice: which exemption a sidecar's rules use, and whether
// the proxy marks its upstream sockets, cannot, or must not start.
func TestExemptionChoice(t *testing.T) {
	canMark := func(uint32) error { return nil }
	cannotMark := func(uint32) error { return errors.New("setting socket mark 0x1169 needs NET_ADMIN") }
	const proxyUID = 1337
	for _, c := range []struct {
		name     string
		e        Exemption
		canMark  func(uint32) error
		kind     string
		mark     uint32
		unmarked string
		err      string
	}{
		{"node", Exemption{Mode: imdsapi.ModeNode, Redirects: true, UID: -1}, cannotMark, "none", 0, "", ""},
		{"cgroup", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true, Cgroup: "/proxy", Mark: 0x1169, UID: -1}, cannotMark, "cgroup", 0, "", ""},
		{"mark", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true, Mark: 0x1169, UID: -1}, canMark, "mark", 0x1169, "", ""},
		{"mark and UID: the mark", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true, Mark: 0x1169, UID: proxyUID}, canMark, "mark", 0x1169, "", ""},
		{"mark unsettable, running as the exempt UID", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true, Mark: 0x1169, UID: proxyUID}, cannotMark,
			"mark", 0, "needs NET_ADMIN", ""},
		{"UID only", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true, UID: proxyUID}, canMark, "uid", 0, "--exempt-mark is 0", ""},
		{"mark unsettable, running as another UID", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true, Mark: 0x1169, UID: 4321}, cannotMark,
			"mark", 0, "", "--exempt-uid 4321, but the proxy runs as UID 1337 and cannot mark its sockets (setting socket mark 0x1169 needs NET_ADMIN)"},
		{"mark unsettable, no UID", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true, Mark: 0x1169, UID: -1}, cannotMark,
			"mark", 0, "", "--rules: setting socket mark 0x1169 needs NET_ADMIN; give the proxy NET_ADMIN"},
		{"no exemption at all", Exemption{Mode: imdsapi.ModeSidecar, Redirects: true, UID: -1}, canMark, "none", 0, "", "--rules: --exempt-mark is 0"},
		{"init container's rules, mark unsettable", Exemption{Mode: imdsapi.ModeSidecar, Mark: 0x1169, UID: -1}, cannotMark,
			"none", 0, "needs NET_ADMIN", ""},
		{"init container's rules, mark", Exemption{Mode: imdsapi.ModeSidecar, Mark: 0x1169, UID: -1}, canMark, "none", 0x1169, "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			mark, unmarked, err := c.e.UpstreamMark(c.canMark, proxyUID)
			if kind := c.e.Kind(); kind != c.kind {
				t.Errorf("kind %q; want %q", kind, c.kind)
			}
			if mark != c.mark || !says(unmarked, c.unmarked) || !says(err, c.err) {
				t.Errorf("mark 0x%x, unmarked %v, err %v; want 0x%x, %q, %q", mark, unmarked, err, c.mark, c.unmarked, c.err)
			}
		})
	}
}

// says whether err is nil when want is "", and else contains want.
func says(err error, want string) bool {
	if want == "" {
		return err == nil
	}
	return err != nil && strings.Contains(err.Error(), want)
}
