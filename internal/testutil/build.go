package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Binaries are the project's programs, built once by a test package's TestMain.
type Binaries struct {
	dir string
	// Proxy is imds-proxy; ProxyNext is the same built as another version,
	// for rollouts; DemoClient is the AWS SDK for Go v2 client of the demo;
	// ClientV1 the same workload on the AWS SDK for Go v1.
	Proxy, ProxyNext, DemoClient, ClientV1 string
}

// BuildBinaries builds imds-proxy and the demo client into a fresh directory
// that any user may read, so tests can run them unprivileged.
func BuildBinaries() (*Binaries, error) {
	dir, err := os.MkdirTemp("", "imds-proxy-bin")
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	b := &Binaries{dir: dir, Proxy: filepath.Join(dir, "imds-proxy"), ProxyNext: filepath.Join(dir, "imds-proxy-next"),
		DemoClient: filepath.Join(dir, "demo-client"), ClientV1: filepath.Join(dir, "demo-client-v1")}
	for out, pkg := range map[string]string{
		b.Proxy:      "github.com/imds-proxy/imds-proxy/cmd/imds-proxy",
		b.ProxyNext:  "github.com/imds-proxy/imds-proxy/cmd/imds-proxy",
		b.DemoClient: "github.com/imds-proxy/imds-proxy/demo/client",
		b.ClientV1:   "github.com/imds-proxy/imds-proxy/demo/clientv1",
	} {
		build := exec.Command("go", "build", "-o", out, pkg)
		if out == b.ProxyNext {
			build.Args = []string{"go", "build", "-ldflags", "-X main.version=next", "-o", out, pkg}
		}
		build.Env = append(os.Environ(), "CGO_ENABLED=0") // static: they also run in containers' images
		if msg, err := build.CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("building %s: %v\n%s", pkg, err, msg)
		}
	}
	return b, nil
}

// Remove deletes the binaries.
func (b *Binaries) Remove() { os.RemoveAll(b.dir) }
