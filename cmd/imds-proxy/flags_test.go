package main

import (
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/peterbourgon/ff/v3"
)

// TestCacheUncachedList: --cache-uncached replaces its default list, from
// repeated flags, a comma-separated environment variable or a YAML list in
// --config, and keeps the default when not given.
func TestCacheUncachedList(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "imds-proxy.yaml")
	if err := os.WriteFile(cfg, []byte("cache-uncached:\n  - spot\n  - /mine/\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		args []string
		env  string
		want []string
	}{
		{"default", nil, "", []string{"spot", "events", "instance-action", "rebalance", "autoscaling"}},
		{"repeated", []string{"--cache-uncached", "a", "--cache-uncached", "b,c"}, "", []string{"a", "b", "c"}},
		{"environment", nil, "x,/y/", []string{"x", "y"}},
		{"config list", []string{"--config", cfg}, "", []string{"spot", "mine"}},
		{"empty: cache everything", []string{"--cache-uncached", ""}, "", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.env != "" {
				t.Setenv("IMDS_PROXY_CACHE_UNCACHED", c.env)
			}
			f, fs := newServeFlags(imdsapi.ModeSidecar, "127.0.0.1:8169", io.Discard)
			if err := ff.Parse(fs, append([]string{"--upstream", "http://127.0.0.1:1"}, c.args...), parseOptions()...); err != nil {
				t.Fatal(err)
			}
			pc, err := f.proxyConfig()
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(pc.Cache.Uncached, c.want) {
				t.Errorf("uncached %q, want %q", pc.Cache.Uncached, c.want)
			}
		})
	}
}
