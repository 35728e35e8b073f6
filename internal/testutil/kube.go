package testutil

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// The kube-apiserver and etcd binaries the Kubernetes tests run: make test
// builds them (the Makefile's $(KUBE_APISERVER) and $(ETCD) targets) and
// passes their paths in these variables. Building kube-apiserver takes
// minutes, too long for a test's timeout, so a test never builds it.
const (
	KubeAPIServerEnv = "KUBE_APISERVER_BIN"
	EtcdEnv          = "ETCD_BIN"
)

// KubeAPIServer is a real kube-apiserver, backed by a real etcd, both on
// 127.0.0.1, with RBAC on. There is no controller manager, scheduler or
// kubelet: objects are stored as the API server validates, defaults and
// admits them, and nothing acts on them.
type KubeAPIServer struct {
	// URL is https://127.0.0.1:PORT.
	URL string
	// LogFile holds kube-apiserver's output.
	LogFile string

	admin *rest.Config
	certs kubeCerts
	stop  func()
}

// Stop stops kube-apiserver (etcd runs on until the test ends): what a
// client sees when the API server goes away. The test's cleanup would
// stop it anyway.
func (s *KubeAPIServer) Stop() { s.stop() }

// Config is a configuration for an administrator (a client certificate
// in system:masters, which RBAC lets do anything). Each call returns a
// new copy.
func (s *KubeAPIServer) Config() *rest.Config { return rest.CopyConfig(s.admin) }

// ImpersonatingConfig acts as user (what kubectl --as=user does) with the
// administrator's credentials: the API server authorises each request as
// user, so RBAC applies as it would to user itself. For a service
// account's user, system:serviceaccount:NAMESPACE:NAME, the API server
// adds the groups a service account's token would carry.
func (s *KubeAPIServer) ImpersonatingConfig(user string, groups ...string) *rest.Config {
	c := s.Config()
	c.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: groups}
	return c
}

// ServiceAccountConfig acts as the service account namespace/name.
func (s *KubeAPIServer) ServiceAccountConfig(namespace, name string) *rest.Config {
	return s.ImpersonatingConfig("system:serviceaccount:" + namespace + ":" + name)
}

// KubeBinaries returns the paths of kube-apiserver and etcd: from
// $KUBE_APISERVER_BIN and $ETCD_BIN, else the newest bin/kube-apiserver-*
// and bin/etcd of the module. If either is missing, the test fails when
// CI=true (CI runs make test, which builds them) and is skipped otherwise,
// saying how to get them.
func KubeBinaries(t testing.TB) (apiserver, etcd string) {
	t.Helper()
	bin := filepath.Join(moduleRoot(), "bin")
	apiserver = os.Getenv(KubeAPIServerEnv)
	if apiserver == "" {
		if found, _ := filepath.Glob(filepath.Join(bin, "kube-apiserver-v*")); len(found) > 0 {
			sort.Strings(found)
			apiserver = found[len(found)-1]
		}
	}
	etcd = os.Getenv(EtcdEnv)
	if etcd == "" {
		etcd = filepath.Join(bin, "etcd")
	}
	var missing []string
	for _, p := range []string{apiserver, etcd} {
		if p == "" {
			missing = append(missing, "kube-apiserver (no $"+KubeAPIServerEnv+", no "+filepath.Join(bin, "kube-apiserver-v*")+")")
		} else if _, err := os.Stat(p); err != nil {
			missing = append(missing, err.Error())
		}
	}
	if len(missing) > 0 {
		msg := "the Kubernetes tests need kube-apiserver and etcd, which make test builds and unpacks into bin/: " + strings.Join(missing, "; ")
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return apiserver, etcd
}

// moduleRoot is the directory of the go.mod above the working directory
// (a test's working directory is its package's).
func moduleRoot() string {
	dir, err := os.Getwd()
	if err != nil {
		return "."
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			return dir
		}
	}
}

// StartKubeAPIServer starts etcd and kube-apiserver on 127.0.0.1 with
// fresh certificates and data, waits until the API server is ready, and
// stops both (by their PIDs) when the test ends.
func StartKubeAPIServer(t testing.TB) *KubeAPIServer {
	t.Helper()
	apiserverBin, etcdBin := KubeBinaries(t)
	dir := t.TempDir()

	// etcd, on loopback only.
	clientAddr, peerAddr := FreeLoopbackAddr(t), FreeLoopbackAddr(t)
	etcdLog := filepath.Join(dir, "etcd.log")
	startProcess(t, "etcd", etcdLog, etcdBin,
		"--name", "test",
		"--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", "http://"+clientAddr,
		"--advertise-client-urls", "http://"+clientAddr,
		"--listen-peer-urls", "http://"+peerAddr,
		"--initial-advertise-peer-urls", "http://"+peerAddr,
		"--initial-cluster", "test=http://"+peerAddr,
		"--log-level", "warn",
	)
	if err := WaitListening(clientAddr, 20*time.Second); err != nil {
		t.Fatalf("etcd did not start: %v\n%s", err, tail(etcdLog))
	}

	certs := makeKubeCerts(t, dir)
	addr := FreeLoopbackAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	s := &KubeAPIServer{URL: "https://" + addr, LogFile: filepath.Join(dir, "kube-apiserver.log"), certs: certs}
	s.stop = startProcess(t, "kube-apiserver", s.LogFile, apiserverBin,
		"--etcd-servers", "http://"+clientAddr,
		"--bind-address", "127.0.0.1",
		"--advertise-address", "127.0.0.1",
		"--secure-port", port,
		"--cert-dir", filepath.Join(dir, "apiserver-certs"),
		"--tls-cert-file", certs.serverCert,
		"--tls-private-key-file", certs.serverKey,
		"--client-ca-file", certs.caCert,
		"--service-account-key-file", certs.saKey,
		"--service-account-signing-key-file", certs.saKey,
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range", "10.0.0.0/24",
		"--endpoint-reconciler-type", "none",
		"--authorization-mode", "RBAC",
		"--enable-priority-and-fairness=false",
		// Kubelets (StartKubelet) are at their Node's InternalIP, with a
		// serving certificate of the test's CA.
		"--kubelet-preferred-address-types", "InternalIP",
		"--kubelet-certificate-authority", certs.caCert,
	)
	s.admin = &rest.Config{
		Host: s.URL,
		TLSClientConfig: rest.TLSClientConfig{
			CAFile:   certs.caCert,
			CertFile: certs.adminCert,
			KeyFile:  certs.adminKey,
		},
		QPS:   100,
		Burst: 200,
	}
	if err := s.waitReady(60 * time.Second); err != nil {
		t.Fatalf("kube-apiserver did not become ready: %v\n%s", err, tail(s.LogFile))
	}
	return s
}

// waitReady polls /readyz as the administrator.
func (s *KubeAPIServer) waitReady(timeout time.Duration) error {
	client, err := rest.HTTPClientFor(s.admin)
	if err != nil {
		return err
	}
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.URL+"/readyz", nil)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("/readyz: %s", resp.Status)
		}
		last = err
		select {
		case <-ctx.Done():
			return last
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// startProcess starts a server process with its output in logFile, and
// stops it by its PID (SIGTERM, then SIGKILL) when the test ends, or
// earlier when the function it returns is called.
func startProcess(t testing.TB, name, logFile, bin string, args ...string) (stop func()) {
	t.Helper()
	out, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		out.Close()
		t.Fatalf("starting %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); out.Close(); close(done) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-done
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// tail is the end of a log file, for a failure message.
func tail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(data) > 8000 {
		data = data[len(data)-8000:]
	}
	return string(data)
}

type kubeCerts struct {
	caCert, serverCert, serverKey, adminCert, adminKey, saKey string
	kubeletCert, kubeletKey                                   string
}

// makeKubeCerts writes a CA, the API server's serving certificate for
// 127.0.0.1, an administrator's client certificate (group
// system:masters), a kubelet's serving certificate for 127.0.0.1 and the
// service account signing key into dir.
func makeKubeCerts(t testing.TB, dir string) kubeCerts {
	t.Helper()
	c := kubeCerts{
		caCert:      filepath.Join(dir, "ca.crt"),
		serverCert:  filepath.Join(dir, "apiserver.crt"),
		serverKey:   filepath.Join(dir, "apiserver.key"),
		adminCert:   filepath.Join(dir, "admin.crt"),
		adminKey:    filepath.Join(dir, "admin.key"),
		saKey:       filepath.Join(dir, "sa.key"),
		kubeletCert: filepath.Join(dir, "kubelet.crt"),
		kubeletKey:  filepath.Join(dir, "kubelet.key"),
	}
	now := time.Now()
	caKey := newKey(t)
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "imds-proxy test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, c.caCert, "CERTIFICATE", caDER)

	issue := func(certFile, keyFile string, template *x509.Certificate) {
		key := newKey(t)
		template.NotBefore, template.NotAfter = now.Add(-time.Hour), now.Add(24*time.Hour)
		template.KeyUsage = x509.KeyUsageDigitalSignature
		der, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(t, certFile, "CERTIFICATE", der)
		writeKey(t, keyFile, key)
	}
	issue(c.serverCert, c.serverKey, &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost", "kubernetes.default.svc"},
	})
	issue(c.adminCert, c.adminKey, &x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}},
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	issue(c.kubeletCert, c.kubeletKey, &x509.Certificate{
		SerialNumber: big.NewInt(4),
		Subject:      pkix.Name{CommonName: "kubelet"},
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	})
	writeKey(t, c.saKey, newKey(t))
	// The files are what the client loads: check they make a pair.
	if _, err := tls.LoadX509KeyPair(c.adminCert, c.adminKey); err != nil {
		t.Fatal(err)
	}
	return c
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func writeKey(t testing.TB, path string, key *ecdsa.PrivateKey) {
	t.Helper()
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, path, "EC PRIVATE KEY", der)
}

func writePEM(t testing.TB, path, blockType string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// ReachableFrom makes the API server reachable from inside ns, as a node
// reaches its cluster's: a relay listening on ns's loopback forwards to
// the server on the test's own. It returns the URL to use in ns.
func (s *KubeAPIServer) ReachableFrom(t testing.TB, ns *Netns) string {
	t.Helper()
	var ln net.Listener
	var err error
	ns.Do(t, func() { ln, err = net.Listen("tcp", "127.0.0.1:0") })
	if err != nil {
		t.Fatalf("relay to the API server in %s: %v", ns, err)
	}
	t.Cleanup(func() { ln.Close() })
	target := strings.TrimPrefix(s.URL, "https://")
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				out, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer out.Close()
				go func() { _, _ = io.Copy(out, in); out.(*net.TCPConn).CloseWrite() }()
				_, _ = io.Copy(in, out)
			}()
		}
	}()
	return "https://" + ln.Addr().String()
}

// Kubeconfig writes a kubeconfig file for the administrator at server
// (s.URL, or what ReachableFrom returned) and returns its path. With as,
// the administrator impersonates that user, whom RBAC then judges.
func (s *KubeAPIServer) Kubeconfig(t testing.TB, server string, as ...string) string {
	t.Helper()
	tls := s.admin.TLSClientConfig
	path := filepath.Join(t.TempDir(), "kubeconfig")
	impersonate := ""
	if len(as) > 0 {
		impersonate = fmt.Sprintf(", as: %q", as[0])
	}
	config := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: %q, certificate-authority: %q}
users:
- name: admin
  user: {client-certificate: %q, client-key: %q%s}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
`, server, tls.CAFile, tls.CertFile, tls.KeyFile, impersonate)
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
