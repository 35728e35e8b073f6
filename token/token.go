// Package token mints and verifies the IMDSv2 session tokens that imds-proxy
// hands to its clients.
//
// Tokens are stateless: each one carries its expiry and an HMAC-SHA256 over
// that expiry and the caller's address, keyed with a secret that never leaves
// the process. Minting a million tokens therefore costs no memory, a token is
// useless to any other caller. With a random key per process (NewRandomMinter)
// a restart invalidates every token, which clients handle like an expired one:
// they receive 401 and fetch a new one. A key file (LoadKeyFile) keeps the key
// across restarts, and after a rotation its previous key verifies the tokens
// it minted for at most MaxTTL.
package token

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// MinTTL and MaxTTL bound the lifetime a client may request, as IMDS does.
const (
	MinTTL = 1 * time.Second
	MaxTTL = 21600 * time.Second
)

// KeySize is the length in bytes of the HMAC key.
const KeySize = 32

const (
	formatVersion = 1
	expiryLen     = 8
	macLen        = sha256.Size
	rawLen        = 1 + expiryLen + macLen
)

// Strict: one token has exactly one spelling.
var encoding = base64.RawURLEncoding.Strict()

// Errors returned by Verify. They are distinct so that callers can count them,
// but a client must only ever see "401 Unauthorized" for all of them.
var (
	ErrMalformed = errors.New("token is malformed")
	ErrForged    = errors.New("token signature does not match this caller")
	ErrExpired   = errors.New("token has expired")
)

// Minter mints and verifies tokens. It is safe for concurrent use.
type Minter struct {
	key [KeySize]byte
	// previous, when hasPrevious, is the key before the last rotation; it
	// verifies (never mints) tokens until previousUntil.
	previous      [KeySize]byte
	hasPrevious   bool
	previousUntil time.Time
	now           func() time.Time
}

// NewMinter returns a Minter keyed with key, which must be KeySize bytes of
// secret randomness. now is the clock; nil means time.Now.
func NewMinter(key []byte, now func() time.Time) (*Minter, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("token key must be %d bytes, got %d", KeySize, len(key))
	}
	if now == nil {
		now = time.Now
	}
	m := &Minter{now: now}
	copy(m.key[:], key)
	return m, nil
}

// Keys are the keys of a Minter: Current mints and verifies; Previous, if
// not nil, is the key Current replaced at Retired, and verifies the tokens
// it minted until Retired+MaxTTL, when the last of them has expired.
type Keys struct {
	Current  []byte
	Previous []byte
	Retired  time.Time
}

// NewMinterWithKeys returns a Minter keyed with keys. now is the clock; nil
// means time.Now.
func NewMinterWithKeys(keys Keys, now func() time.Time) (*Minter, error) {
	m, err := NewMinter(keys.Current, now)
	if err != nil || keys.Previous == nil {
		return m, err
	}
	if len(keys.Previous) != KeySize {
		return nil, fmt.Errorf("previous token key must be %d bytes, got %d", KeySize, len(keys.Previous))
	}
	if keys.Retired.IsZero() {
		return nil, errors.New("a previous token key needs the time it was retired")
	}
	copy(m.previous[:], keys.Previous)
	m.hasPrevious, m.previousUntil = true, keys.Retired.Add(MaxTTL)
	return m, nil
}

// NewRandomMinter returns a Minter with a fresh key from crypto/rand.
func NewRandomMinter() (*Minter, error) {
	key := make([]byte, KeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("reading random token key: %w", err)
	}
	return NewMinter(key, nil)
}

// Mint returns a token for caller that expires ttl from now, and that expiry.
// ttl must lie within [MinTTL, MaxTTL].
func (m *Minter) Mint(caller netip.Addr, ttl time.Duration) (string, time.Time, error) {
	if ttl < MinTTL || ttl > MaxTTL {
		return "", time.Time{}, fmt.Errorf("token TTL %s is outside %s..%s", ttl, MinTTL, MaxTTL)
	}
	if !caller.IsValid() {
		return "", time.Time{}, errors.New("a token needs a caller address")
	}
	expiry := m.now().Add(ttl).UnixMilli()
	raw := make([]byte, 1+expiryLen, rawLen)
	raw[0] = formatVersion
	binary.BigEndian.PutUint64(raw[1:], uint64(expiry))
	raw = append(raw, sign(&m.key, raw, caller)...)
	return encoding.EncodeToString(raw), time.UnixMilli(expiry), nil
}

// Verify reports whether tok was minted by m for caller and has not expired.
// The signature is compared in constant time.
func (m *Minter) Verify(tok string, caller netip.Addr) error {
	if encoding.DecodedLen(len(tok)) != rawLen {
		return ErrMalformed
	}
	raw, err := encoding.DecodeString(tok)
	if err != nil || len(raw) != rawLen || raw[0] != formatVersion {
		return ErrMalformed
	}
	signed, mac := raw[:1+expiryLen], raw[1+expiryLen:]
	if !caller.IsValid() {
		return ErrForged
	}
	now := m.now()
	if !hmac.Equal(mac, sign(&m.key, signed, caller)) &&
		!(m.hasPrevious && now.Before(m.previousUntil) && hmac.Equal(mac, sign(&m.previous, signed, caller))) {
		return ErrForged
	}
	expiry := int64(binary.BigEndian.Uint64(raw[1:]))
	if now.UnixMilli() >= expiry {
		return ErrExpired
	}
	return nil
}

// sign returns the MAC under key of the version and expiry bound to caller.
// IPv4-mapped IPv6 addresses are unmapped so that one client is one caller
// on dual-stack listeners.
func sign(key *[KeySize]byte, signed []byte, caller netip.Addr) []byte {
	mac := hmac.New(sha256.New, key[:])
	mac.Write(signed)
	caller = caller.Unmap() // an IPv4 address has no zone, even spelt IPv4-mapped with one
	addr := caller.As16()
	mac.Write(addr[:])
	// The zone tells links apart: fe80::1 on eth0 and on veth9 are two hosts.
	mac.Write([]byte(caller.Zone()))
	return mac.Sum(nil)
}
