package token

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/imds-proxy/imds-proxy/imdsapi"
)

// ErrBadTTL means the TTL header was missing, repeated, not a whole number of
// seconds, or out of range. IMDS answers all of these with 400.
var ErrBadTTL = errors.New("bad token TTL")

// ParseTTL parses the values of the TTL header as IMDS does: exactly one value
// of decimal digits between 1 and 21600.
func ParseTTL(values []string) (time.Duration, error) {
	if len(values) != 1 {
		return 0, fmt.Errorf("%w: want exactly one %s header, got %d", ErrBadTTL, imdsapi.TokenTTLHeader, len(values))
	}
	v := values[0]
	if v == "" || len(v) > 5 || !allDigits(v) {
		return 0, fmt.Errorf("%w: %q is not a whole number of seconds", ErrBadTTL, truncate(v, 16))
	}
	secs, _ := strconv.Atoi(v) // cannot fail: at most five digits
	ttl := time.Duration(secs) * time.Second
	if ttl < MinTTL || ttl > MaxTTL {
		return 0, fmt.Errorf("%w: %d seconds is outside 1..21600", ErrBadTTL, secs)
	}
	return ttl, nil
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
