package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Binaries are the project's programs, built once by a test package's TestMain.
type Binaries struct {
	dir string
	// Proxy is imds-proxy; ProxyNext is the same built as another version,
	// for rollouts; ProxyKubernetes is the build with the Kubernetes source
	// (the kubernetes tag), which the node DaemonSet runs;
	// ProxyWorkloadRole is the build that can serve a workload's own role
	// (the workloadrole tag, --credentials=workload); DemoClient is the
	// AWS SDK for Go v2 client of the demo; ClientV1 the same workload on
	// the AWS SDK for Go v1.
	Proxy, ProxyNext, ProxyKubernetes, ProxyWorkloadRole, DemoClient, ClientV1 string
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
		ProxyKubernetes: filepath.Join(dir, "imds-proxy-kubernetes"), ProxyWorkloadRole: filepath.Join(dir, "imds-proxy-workload-role"),
		DemoClient: filepath.Join(dir, "demo-client"), ClientV1: filepath.Join(dir, "demo-client-v1")}
	for out, pkg := range map[string]string{
		b.Proxy:             proxyPackage,
		b.ProxyNext:         proxyPackage,
		b.ProxyKubernetes:   proxyPackage,
		b.ProxyWorkloadRole: proxyPackage,
		b.DemoClient:        "github.com/imds-proxy/imds-proxy/demo/client",
		b.ClientV1:          "github.com/imds-proxy/imds-proxy/demo/clientv1",
	} {
		var flags []string
		switch out {
		case b.ProxyNext:
			flags = []string{"-ldflags", "-X main.version=next"}
		case b.ProxyKubernetes:
			flags = []string{"-tags", "kubernetes"}
		case b.ProxyWorkloadRole:
			flags = []string{"-tags", "workloadrole"}
		}
		if err := goBuild(out, pkg, flags...); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	return b, nil
}

// BuildProxy builds imds-proxy alone into the test's temporary directory
// and returns its path: for a test or benchmark that runs no other program
// of the project.
func BuildProxy(t testing.TB) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "imds-proxy")
	if err := goBuild(out, proxyPackage); err != nil {
		t.Fatal(err)
	}
	return out
}

const proxyPackage = "github.com/imds-proxy/imds-proxy/cmd/imds-proxy"

// goBuild builds pkg into out, statically: the binaries also run in
// containers' images.
func goBuild(out, pkg string, flags ...string) error {
	build := exec.Command("go", append(append([]string{"build"}, flags...), "-o", out, pkg)...)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("building %s: %v\n%s", pkg, err, msg)
	}
	return nil
}

// Remove deletes the binaries.
func (b *Binaries) Remove() { os.RemoveAll(b.dir) }
