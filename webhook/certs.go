package webhook

import (
	"crypto/tls"
	"fmt"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"
)

// CertReloader serves the key pair in two files and reads them again when
// either changes: a Secret volume update (an atomic symlink swap) or a
// cert-manager renewal needs no restart. It checks the files at most once
// per CheckInterval, on a TLS handshake.
type CertReloader struct {
	certFile, keyFile string
	log               *zap.Logger

	mu      sync.Mutex
	cert    *tls.Certificate
	stamp   string
	checked time.Time
}

// CheckInterval bounds how often a handshake looks at the files.
const CheckInterval = time.Second

// NewCertReloader loads the key pair, failing if it cannot.
func NewCertReloader(certFile, keyFile string, log *zap.Logger) (*CertReloader, error) {
	c := &CertReloader{certFile: certFile, keyFile: keyFile, log: log}
	if err := c.load(); err != nil {
		return nil, err
	}
	return c, nil
}

// GetCertificate is for tls.Config.GetCertificate. A pair that fails to
// load (half written, say) is logged and the previous one kept.
func (c *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.checked) >= CheckInterval {
		if stamp, err := c.fileStamp(); err == nil && stamp != c.stamp {
			if err := c.loadLocked(); err != nil {
				c.log.Warn("TLS key pair changed but does not load; serving the previous one", zap.Error(err))
			} else {
				c.log.Info("TLS key pair reloaded", zap.String("cert", c.certFile))
			}
		}
		c.checked = time.Now()
	}
	return c.cert, nil
}

func (c *CertReloader) load() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.loadLocked()
}

func (c *CertReloader) loadLocked() error {
	stamp, err := c.fileStamp()
	if err != nil {
		return err
	}
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("TLS key pair %s, %s: %w", c.certFile, c.keyFile, err)
	}
	c.cert, c.stamp, c.checked = &cert, stamp, time.Now()
	return nil
}

// fileStamp changes whenever either file is replaced or rewritten. Stat
// follows the symlinks of a Secret volume to the files they name now.
func (c *CertReloader) fileStamp() (string, error) {
	stamp := ""
	for _, name := range []string{c.certFile, c.keyFile} {
		info, err := os.Stat(name)
		if err != nil {
			return "", fmt.Errorf("TLS file: %w", err)
		}
		stamp += fmt.Sprintf("%s:%d:%d;", name, info.Size(), info.ModTime().UnixNano())
	}
	return stamp, nil
}
