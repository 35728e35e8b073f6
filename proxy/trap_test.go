package proxy_test

import (
	"testing"

	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// newTrap is a loopback listener that answers nothing and counts what reaches it.
func newTrap(t *testing.T) *testutil.Tap { return testutil.NewTap(t, "") }
