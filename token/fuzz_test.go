package token_test

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/imds-proxy/imds-proxy/token"
)

// The seed corpora are in testdata/fuzz/<FuzzName>/; `go test` runs every
// seed as an ordinary test, `go test -fuzz=FuzzX` explores from them.

// ttlSyntax is the oracle's TTL grammar, written independently of ParseTTL:
// one to five ASCII digits, nothing else.
var ttlSyntax = regexp.MustCompile(`^[0-9]{1,5}$`)

// ttlOracle says what ParseTTL must return for values: exactly one value of
// one to five ASCII digits whose number lies in 1..21600.
func ttlOracle(values []string) (time.Duration, bool) {
	if len(values) != 1 || !ttlSyntax.MatchString(values[0]) {
		return 0, false
	}
	n, err := strconv.ParseUint(values[0], 10, 64)
	if err != nil || n < 1 || n > 21600 {
		return 0, false
	}
	return time.Duration(n) * time.Second, true
}

// FuzzParseTTL checks ParseTTL against ttlOracle for zero, one or two header
// values (count picks how many of a and b are passed). A refusal must wrap
// ErrBadTTL and stay short and printable: its text goes into the 400 body.
func FuzzParseTTL(f *testing.F) {
	f.Fuzz(func(t *testing.T, a, b string, count uint8) {
		var values []string
		switch count % 4 {
		case 0:
			values = nil
		case 1:
			values = []string{a}
		case 2:
			values = []string{a, b}
		case 3:
			values = []string{}
		}
		got, err := token.ParseTTL(values)
		want, ok := ttlOracle(values)
		if ok {
			if err != nil || got != want {
				t.Fatalf("ParseTTL(%q) = %v, %v; want %v", values, got, err, want)
			}
			return
		}
		if err == nil {
			t.Fatalf("ParseTTL(%q) = %v, nil; want ErrBadTTL", values, got)
		}
		if !errors.Is(err, token.ErrBadTTL) || got != 0 {
			t.Fatalf("ParseTTL(%q) = %v, %v; want 0 and an error wrapping ErrBadTTL", values, got, err)
		}
		msg := err.Error()
		if len(msg) > 160 || !utf8.ValidString(msg) || strings.ContainsAny(msg, "\r\n\x00") {
			t.Fatalf("ParseTTL(%q): error %q is too long or not printable (it is sent to the client)", values, msg)
		}
	})
}

// fuzzKey is the key of the test minter (as in token_test.go); the seeds in
// testdata/fuzz/FuzzVerify hold real tokens minted with it.
var fuzzKey = bytes.Repeat([]byte{7}, token.KeySize)

// oracleVerify is an independent implementation of the token contract: tok
// is valid for caller at nowMs if and only if it is exactly the unpadded
// base64url spelling of 0x01 | expiry (big-endian ms) | HMAC-SHA256(key,
// 0x01 | expiry | caller as 16 bytes, IPv4 unmapped then mapped | zone), and
// nowMs is before expiry; no token is valid for the zero address.
func oracleVerify(tok string, caller netip.Addr, nowMs int64) bool {
	if !caller.IsValid() || len(tok) != base64.RawURLEncoding.EncodedLen(1+8+sha256.Size) {
		return false
	}
	head, err := base64.RawURLEncoding.DecodeString(tok[:12]) // 12 characters = the 9 signed bytes
	if err != nil || len(head) != 9 || head[0] != 1 {
		return false
	}
	return tok == oracleToken(int64(binary.BigEndian.Uint64(head[1:])), caller) &&
		nowMs < int64(binary.BigEndian.Uint64(head[1:]))
}

// oracleToken spells the token for expiryMs and caller.
func oracleToken(expiryMs int64, caller netip.Addr) string {
	signed := make([]byte, 9, 9+sha256.Size)
	signed[0] = 1
	binary.BigEndian.PutUint64(signed[1:], uint64(expiryMs))
	mac := hmac.New(sha256.New, fuzzKey)
	mac.Write(signed)
	caller = caller.Unmap()
	addr := caller.As16()
	mac.Write(addr[:])
	mac.Write([]byte(caller.Zone()))
	return base64.RawURLEncoding.EncodeToString(mac.Sum(signed))
}

// callerFrom makes a caller address out of fuzz bytes: 4 bytes IPv4, 16
// bytes IPv6 (IPv4-mapped too), more than 16 an IPv6 address with the rest
// as its zone. Other lengths are no address.
func callerFrom(b []byte) (netip.Addr, bool) {
	switch {
	case len(b) == 4:
		return netip.AddrFrom4([4]byte(b)), true
	case len(b) == 16:
		return netip.AddrFrom16([16]byte(b)), true
	case len(b) > 16:
		return netip.AddrFrom16([16]byte(b[:16])).WithZone(string(b[16:])), true
	}
	return netip.Addr{}, false
}

// sameCaller is the oracle's notion of one caller: an IPv4 address and its
// IPv4-mapped IPv6 form are one caller (dual-stack listeners); the zone is
// part of an address (fe80::1 on two links is two hosts); the zero address
// is nobody.
func sameCaller(a, b netip.Addr) bool {
	return a.IsValid() && a.Unmap() == b.Unmap()
}

// mutate changes tok according to kind, pos and x; the result may equal tok
// (the caller checks).
func mutate(tok string, kind uint8, pos uint16, x byte) string {
	if tok == "" {
		return string(x)
	}
	i := int(pos) % len(tok)
	b := []byte(tok)
	switch kind % 8 {
	case 0: // flip bits
		if x == 0 {
			x = 1
		}
		b[i] ^= x
	case 1: // truncate
		b = b[:i]
	case 2: // insert
		b = append(b[:i], append([]byte{x}, b[i:]...)...)
	case 3: // delete
		b = append(b[:i], b[i+1:]...)
	case 4: // overwrite
		b[i] = x
	case 5: // append
		b = append(b, x)
	case 6: // swap with the next byte
		j := (i + 1) % len(b)
		b[i], b[j] = b[j], b[i]
	case 7: // pad: standard base64 padding, whitespace, a second copy
		return tok + [...]string{"=", "==", " ", "\t", "\n", "\r\n", tok, "." + tok}[x%8]
	}
	return string(b)
}

// FuzzVerify checks, for a caller, a TTL and a clock taken from the input:
//   - Mint succeeds exactly for TTLs in 1..21600 s, and spells the token the
//     oracle spells;
//   - the token verifies for that caller (and only for the same caller) until
//     its expiry, to the millisecond, and not from then on;
//   - a mutation of its bytes never verifies;
//   - an arbitrary string verifies exactly when the oracle says it is a real
//     token (the seeds hold real ones), and Verify never panics.
func FuzzVerify(f *testing.F) {
	f.Fuzz(func(t *testing.T, arbitrary string, callerBytes, otherBytes []byte, ttlSecs uint16,
		clockNs int64, elapsedMs uint32, mutKind uint8, mutPos uint16, mutByte byte) {
		caller, ok := callerFrom(callerBytes)
		if !ok {
			return
		}
		now := time.Unix(0, clockNs)
		m, err := token.NewMinter(fuzzKey, func() time.Time { return now })
		if err != nil {
			t.Fatal(err)
		}
		nowMs := now.UnixMilli()

		// An arbitrary string, at the clock plus elapsed.
		later := now.Add(time.Duration(elapsedMs) * time.Millisecond)
		now = later
		err = m.Verify(arbitrary, caller)
		checkKnownError(t, err)
		if want := oracleVerify(arbitrary, caller, later.UnixMilli()); (err == nil) != want {
			t.Fatalf("Verify(%q, %s) at %d ms = %v; the oracle says valid=%v", arbitrary, caller, later.UnixMilli(), err, want)
		}
		now = time.Unix(0, clockNs)

		// Minting.
		ttl := time.Duration(ttlSecs) * time.Second
		tok, expiry, err := m.Mint(caller, ttl)
		if inRange := ttlSecs >= 1 && ttlSecs <= 21600; (err == nil) != inRange {
			t.Fatalf("Mint(%s, %s) error = %v; want an error exactly outside 1..21600 s", caller, ttl, err)
		}
		if err != nil {
			ttl = time.Duration(1+int(ttlSecs)%21600) * time.Second
			if tok, expiry, err = m.Mint(caller, ttl); err != nil {
				t.Fatalf("Mint(%s, %s): %v", caller, ttl, err)
			}
		}
		wantExpiry := nowMs + ttl.Milliseconds()
		if expiry.UnixMilli() != wantExpiry {
			t.Fatalf("Mint at %d ms with TTL %s: expiry %d ms, want %d", nowMs, ttl, expiry.UnixMilli(), wantExpiry)
		}
		if want := oracleToken(wantExpiry, caller); tok != want {
			t.Fatalf("Mint(%s, %s) = %q, the oracle spells it %q", caller, ttl, tok, want)
		}

		// Valid until expiry for the same caller, at the elapsed time.
		now = later
		err = m.Verify(tok, caller)
		if valid := int64(elapsedMs) < ttl.Milliseconds(); valid && err != nil {
			t.Fatalf("token for %s with TTL %s refused %d ms after minting: %v", caller, ttl, elapsedMs, err)
		} else if !valid && !errors.Is(err, token.ErrExpired) {
			t.Fatalf("token for %s with TTL %s: %d ms after minting Verify = %v, want ErrExpired", caller, ttl, elapsedMs, err)
		}
		// At the last valid millisecond and at expiry exactly.
		now = time.UnixMilli(wantExpiry - 1)
		if err := m.Verify(tok, caller); err != nil {
			t.Fatalf("token refused 1 ms before its expiry: %v", err)
		}
		now = time.UnixMilli(wantExpiry)
		if err := m.Verify(tok, caller); !errors.Is(err, token.ErrExpired) {
			t.Fatalf("token at its expiry: Verify = %v, want ErrExpired", err)
		}
		now = time.Unix(0, clockNs)

		// Another caller.
		if other, ok := callerFrom(otherBytes); ok {
			err := m.Verify(tok, other)
			if sameCaller(caller, other) && err != nil {
				t.Fatalf("token for %s refused for the same caller spelt %s: %v", caller, other, err)
			}
			if !sameCaller(caller, other) && !errors.Is(err, token.ErrForged) {
				t.Fatalf("token for %s presented by %s: Verify = %v, want ErrForged", caller, other, err)
			}
		}

		// Any other spelling of the token.
		if mutated := mutate(tok, mutKind, mutPos, mutByte); mutated != tok {
			err := m.Verify(mutated, caller)
			checkKnownError(t, err)
			if err == nil {
				t.Fatalf("mutated token %q (from %q, kind %d at %d) verified", mutated, tok, mutKind%8, mutPos)
			}
		}
	})
}

// checkKnownError fails unless err is nil or one of Verify's three errors.
func checkKnownError(t *testing.T, err error) {
	t.Helper()
	if err != nil && !errors.Is(err, token.ErrMalformed) && !errors.Is(err, token.ErrForged) && !errors.Is(err, token.ErrExpired) {
		t.Fatalf("Verify returned an unknown error %v", err)
	}
}
