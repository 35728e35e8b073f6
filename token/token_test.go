package token

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// fakeClock is a settable clock for expiry tests.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func newTestMinter(t *testing.T, clock *fakeClock) *Minter {
	t.Helper()
	m, err := NewMinter(bytes.Repeat([]byte{7}, KeySize), clock.now)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

var (
	alice = netip.MustParseAddr("10.0.0.1")
	bob   = netip.MustParseAddr("10.0.0.2")
)

func TestMintVerifyRoundTrip(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1_700_000_000, 123_000_000)}
	m := newTestMinter(t, clock)
	tok, expiry, err := m.Mint(alice, 300*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if want := clock.t.Add(300 * time.Second); !expiry.Equal(want) {
		t.Errorf("expiry = %v, want %v", expiry, want)
	}
	if err := m.Verify(tok, alice); err != nil {
		t.Errorf("Verify(fresh token) = %v, want nil", err)
	}
	if strings.ContainsAny(tok, "+/= \r\n") {
		t.Errorf("token %q has characters that need escaping in a header", tok)
	}
}

func TestTokenExpiresExactlyAtTTL(t *testing.T) {
	for _, ttl := range []time.Duration{MinTTL, 300 * time.Second, MaxTTL} {
		clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
		m := newTestMinter(t, clock)
		tok, _, err := m.Mint(alice, ttl)
		if err != nil {
			t.Fatal(err)
		}
		clock.t = clock.t.Add(ttl - time.Millisecond)
		if err := m.Verify(tok, alice); err != nil {
			t.Errorf("ttl %s: 1ms before expiry Verify = %v, want nil", ttl, err)
		}
		clock.t = clock.t.Add(time.Millisecond)
		if err := m.Verify(tok, alice); !errors.Is(err, ErrExpired) {
			t.Errorf("ttl %s: at expiry Verify = %v, want ErrExpired", ttl, err)
		}
	}
}

func TestTokenIsBoundToCaller(t *testing.T) {
	m := newTestMinter(t, &fakeClock{t: time.Unix(1_700_000_000, 0)})
	tok, _, _ := m.Mint(alice, time.Minute)
	if err := m.Verify(tok, bob); !errors.Is(err, ErrForged) {
		t.Errorf("Verify(alice's token, bob) = %v, want ErrForged", err)
	}
	mapped := netip.AddrFrom16(alice.As16())
	if err := m.Verify(tok, mapped); err != nil {
		t.Errorf("Verify(alice's token, ::ffff:%s) = %v, want nil (same caller on a dual-stack socket)", alice, err)
	}
}

func TestEveryTamperedByteIsRejected(t *testing.T) {
	m := newTestMinter(t, &fakeClock{t: time.Unix(1_700_000_000, 0)})
	tok, _, _ := m.Mint(alice, time.Minute)
	raw, _ := encoding.DecodeString(tok)
	for i := range raw {
		tampered := append([]byte(nil), raw...)
		tampered[i] ^= 0x01
		if err := m.Verify(encoding.EncodeToString(tampered), alice); err == nil {
			t.Errorf("flipping a bit of byte %d was accepted", i)
		}
	}
}

func TestExtendedExpiryIsRejected(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	m := newTestMinter(t, clock)
	tok, expiry, _ := m.Mint(alice, time.Second)
	raw, _ := encoding.DecodeString(tok)
	binary.BigEndian.PutUint64(raw[1:], uint64(expiry.Add(time.Hour).UnixMilli()))
	clock.t = clock.t.Add(2 * time.Second)
	if err := m.Verify(encoding.EncodeToString(raw), alice); !errors.Is(err, ErrForged) {
		t.Errorf("token with a forged later expiry: Verify = %v, want ErrForged", err)
	}
}

func TestTokenFromAnotherKeyIsRejected(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	m := newTestMinter(t, clock)
	other, err := NewRandomMinter()
	if err != nil {
		t.Fatal(err)
	}
	tok, _, _ := other.Mint(alice, time.Minute)
	if err := m.Verify(tok, alice); !errors.Is(err, ErrForged) {
		t.Errorf("Verify(other key's token) = %v, want ErrForged", err)
	}
}

func TestMalformedTokens(t *testing.T) {
	m := newTestMinter(t, &fakeClock{t: time.Unix(1_700_000_000, 0)})
	good, _, _ := m.Mint(alice, time.Minute)
	for name, tok := range map[string]string{
		"empty":        "",
		"truncated":    good[:len(good)-1],
		"extended":     good + "A",
		"bad alphabet": "!" + good[1:],
		"std base64":   strings.Repeat("+", len(good)),
		"huge":         strings.Repeat("A", 1<<16),
	} {
		if err := m.Verify(tok, alice); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: Verify = %v, want ErrMalformed", name, err)
		}
	}
}

func TestMintRefusesTTLOutsideRange(t *testing.T) {
	m := newTestMinter(t, &fakeClock{t: time.Unix(1_700_000_000, 0)})
	for _, ttl := range []time.Duration{0, time.Millisecond * 999, MaxTTL + time.Second, -time.Second} {
		if _, _, err := m.Mint(alice, ttl); err == nil {
			t.Errorf("Mint(ttl %s) succeeded, want error", ttl)
		}
	}
}

func TestNewMinterRejectsShortKey(t *testing.T) {
	if _, err := NewMinter(make([]byte, KeySize-1), nil); err == nil {
		t.Error("NewMinter accepted a 31-byte key")
	}
}

func TestRandomMintersHaveDistinctKeys(t *testing.T) {
	a, _ := NewRandomMinter()
	b, _ := NewRandomMinter()
	if a.key == b.key {
		t.Error("two random minters share a key")
	}
}

func TestParseTTL(t *testing.T) {
	cases := []struct {
		values []string
		want   time.Duration
		ok     bool
	}{
		{[]string{"1"}, time.Second, true},
		{[]string{"300"}, 300 * time.Second, true},
		{[]string{"21600"}, MaxTTL, true},
		{[]string{"00300"}, 300 * time.Second, true},
		{nil, 0, false},
		{[]string{""}, 0, false},
		{[]string{"0"}, 0, false},
		{[]string{"21601"}, 0, false},
		{[]string{"-1"}, 0, false},
		{[]string{"+300"}, 0, false},
		{[]string{"1.5"}, 0, false},
		{[]string{"1e3"}, 0, false},
		{[]string{"abc"}, 0, false},
		{[]string{"300s"}, 0, false},
		{[]string{"999999999999999999999"}, 0, false},
		{[]string{"300", "300"}, 0, false},
	}
	for _, c := range cases {
		got, err := ParseTTL(c.values)
		if c.ok && (err != nil || got != c.want) {
			t.Errorf("ParseTTL(%q) = %v, %v; want %v", c.values, got, err, c.want)
		}
		if !c.ok && !errors.Is(err, ErrBadTTL) {
			t.Errorf("ParseTTL(%q) = %v, %v; want ErrBadTTL", c.values, got, err)
		}
	}
}

// TestOneSpellingPerToken: base64 leaves two spare bits in the last
// character; a token with them set is not the same token.
func TestOneSpellingPerToken(t *testing.T) {
	m := newTestMinter(t, &fakeClock{t: time.Unix(1_700_000_000, 0)})
	tok, _, _ := m.Mint(alice, time.Minute)
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	last := strings.IndexByte(alphabet, tok[len(tok)-1])
	for spare := 1; spare < 4; spare++ {
		alt := tok[:len(tok)-1] + string(alphabet[last^spare])
		if err := m.Verify(alt, alice); !errors.Is(err, ErrMalformed) {
			t.Errorf("alternative spelling %q: Verify = %v, want ErrMalformed", alt, err)
		}
	}
}

// TestCallerIdentity: a token belongs to one address on one link (zone),
// and the zero address is no caller at all.
func TestCallerIdentity(t *testing.T) {
	m, err := NewRandomMinter()
	if err != nil {
		t.Fatal(err)
	}
	eth0 := netip.MustParseAddr("fe80::1%eth0")
	tok, _, err := m.Mint(eth0, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Verify(tok, eth0); err != nil {
		t.Errorf("own caller: %v", err)
	}
	if err := m.Verify(tok, netip.MustParseAddr("fe80::1%veth9")); !errors.Is(err, ErrForged) {
		t.Errorf("same address on another link: %v, want ErrForged", err)
	}
	if _, _, err := m.Mint(netip.Addr{}, time.Minute); err == nil {
		t.Error("minted a token for the zero address")
	}
	if err := m.Verify(tok, netip.Addr{}); !errors.Is(err, ErrForged) {
		t.Errorf("zero address: %v, want ErrForged", err)
	}
}
