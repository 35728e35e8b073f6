package iptables

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func sidecarConfig() Config {
	return Config{Mode: imdsapi.ModeSidecar, ProxyPort: 8169, ExemptMark: 0x1169, ExemptUID: -1}
}

func nodeConfig() Config {
	return Config{Mode: imdsapi.ModeNode, ProxyPort: 8169, ExemptUID: -1, Interfaces: []string{"docker0", "br-+", "cni+", "eni+", "cali+", "lxc+", "veth+"},
		NodeAddress: netip.MustParseAddr("10.0.1.10")}
}

// TestRulesGolden pins, for one base configuration of each mode and one
// change to it per case, the rules as `rules show` prints them
// (<case>-<family>.golden) and the iptables-restore input that installs
// them (<case>-<family>.restore.golden). The restore input also depends on
// what is in place: fresh (no jump yet), reinstall (every jump already
// heads its chain) or repair (a jump is elsewhere, and restore deletes it
// while inserting it first). go test ./iptables -update rewrites the files.
func TestRulesGolden(t *testing.T) {
	const fresh, reinstall, repair = "", "reinstall", "repair"
	for _, c := range []struct {
		name   string
		base   func() Config
		change func(*Config)
		state  string
	}{
		{"sidecar", sidecarConfig, func(*Config) {}, fresh},
		{"sidecar-uid", sidecarConfig, func(c *Config) { c.ExemptMark, c.ExemptUID = 0, 1337 }, fresh},
		{"sidecar-cgroup", sidecarConfig, func(c *Config) { c.ExemptCgroup, c.ExemptMark = "/", 0 }, fresh},
		{"sidecar-mark-uid", sidecarConfig, func(c *Config) { c.ExemptUID = 1337 }, fresh},
		{"sidecar-port", sidecarConfig, func(c *Config) { c.ProxyPort = 18169 }, fresh},
		{"node", nodeConfig, func(*Config) {}, fresh},
		{"node-eni", nodeConfig, func(c *Config) {
			c.Interfaces, c.NodeAddress = []string{"eni+"}, netip.MustParseAddr("10.0.2.20")
		}, fresh},
		{"sidecar-reinstall", sidecarConfig, func(*Config) {}, reinstall},
		{"sidecar-repair", sidecarConfig, func(*Config) {}, repair},
		{"node-repair", nodeConfig, func(*Config) {}, repair},
	} {
		cfg := c.base()
		c.change(&cfg)
		if err := cfg.Validate(); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		for _, family := range []Family{IPv4, IPv6} {
			rs := Build(cfg, family)
			file := filepath.Join("testdata", c.name+"-"+string(family))
			if c.state == fresh {
				checkGolden(t, file+".golden", rs.Render())
			}
			deletes := map[string][]string{}
			if c.state == repair {
				for _, j := range rs.Jumps {
					deletes[j.Table] = append(deletes[j.Table], "-D "+j.Chain+" "+quoteSpec(j.Spec))
				}
			}
			input := withDeletes(rs.restoreInput(func(Rule) bool { return c.state == reinstall }), deletes)
			checkGolden(t, file+".restore.golden", input)
		}
	}
}

// checkGolden compares got with the golden file, or rewrites it under -update.
func checkGolden(t *testing.T, file, got string) {
	t.Helper()
	if *update {
		if err := os.WriteFile(file, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("%v (run go test ./iptables -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from the golden file:\n%s", file, got)
	}
}

func TestOnlyJumpsTouchBuiltInChains(t *testing.T) {
	for _, cfg := range []Config{sidecarConfig(), nodeConfig()} {
		rs := Build(cfg, IPv4)
		for _, r := range rs.Rules {
			if !strings.HasPrefix(r.Chain, "IMDS_PROXY_") {
				t.Errorf("%s: rule in built-in chain %s: %v", cfg.Mode, r.Chain, r.Spec)
			}
		}
		seen := map[string]bool{}
		for _, j := range rs.Jumps {
			if seen[j.Table+j.Chain] {
				t.Errorf("%s: two jumps from %s/%s", cfg.Mode, j.Table, j.Chain)
			}
			seen[j.Table+j.Chain] = true
		}
		for _, r := range append(rs.Rules, rs.Jumps...) {
			spec := strings.Join(r.Spec, " ")
			if !strings.Contains(spec, "--comment imds-proxy: ") {
				t.Errorf("%s: rule without the imds-proxy comment: %s", cfg.Mode, spec)
			}
			if strings.Contains(spec, "169.254.170.") || strings.Contains(spec, "fd00:ec2::23") {
				t.Errorf("%s: rule touches the ECS or EKS credential endpoints: %s", cfg.Mode, spec)
			}
		}
	}
}

func TestValidate(t *testing.T) {
	bad := map[string]Config{
		"port 0":             {Mode: imdsapi.ModeSidecar, ExemptMark: 1, ExemptUID: -1},
		"no exemption":       {Mode: imdsapi.ModeSidecar, ProxyPort: 8169, ExemptUID: -1},
		"node no interfaces": {Mode: imdsapi.ModeNode, ProxyPort: 8169, ExemptUID: -1},
		"bad interface":      {Mode: imdsapi.ModeNode, ProxyPort: 8169, ExemptUID: -1, Interfaces: []string{"eth0 -j ACCEPT"}},
		"long interface":     {Mode: imdsapi.ModeNode, ProxyPort: 8169, ExemptUID: -1, Interfaces: []string{"averyveryverylongname"}},
		"unknown mode":       {Mode: "host", ProxyPort: 8169},
		"relative cgroup":    {Mode: imdsapi.ModeSidecar, ProxyPort: 8169, ExemptUID: -1, ExemptCgroup: "kubepods/x"},
		"node no address":    {Mode: imdsapi.ModeNode, ProxyPort: 8169, ExemptUID: -1, Interfaces: []string{"eni+"}},
		"node loopback":      {Mode: imdsapi.ModeNode, ProxyPort: 8169, ExemptUID: -1, Interfaces: []string{"eni+"}, NodeAddress: netip.MustParseAddr("127.0.0.1")},
	}
	for name, cfg := range bad {
		if err := cfg.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	for _, cfg := range []Config{sidecarConfig(), nodeConfig()} {
		if err := cfg.Validate(); err != nil {
			t.Errorf("%s: %v", cfg.Mode, err)
		}
	}
}
