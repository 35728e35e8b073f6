package token

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestPreviousKeyVerifiesUntilRetiredPlusMaxTTL(t *testing.T) {
	oldKey, newKey := bytes.Repeat([]byte{1}, KeySize), bytes.Repeat([]byte{2}, KeySize)
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	old, err := NewMinter(oldKey, clock.now)
	if err != nil {
		t.Fatal(err)
	}
	// The last token of the old key, minted just before the rotation with
	// the longest TTL.
	tok, _, err := old.Mint(alice, MaxTTL)
	if err != nil {
		t.Fatal(err)
	}
	retired := clock.t
	rotated, err := NewMinterWithKeys(Keys{Current: newKey, Previous: oldKey, Retired: retired}, clock.now)
	if err != nil {
		t.Fatal(err)
	}
	if err := rotated.Verify(tok, alice); err != nil {
		t.Errorf("previous key's token right after the rotation: Verify = %v, want nil", err)
	}
	if err := rotated.Verify(tok, bob); !errors.Is(err, ErrForged) {
		t.Errorf("previous key's token from another caller: Verify = %v, want ErrForged", err)
	}
	fresh, _, _ := rotated.Mint(alice, time.Minute)
	if err := old.Verify(fresh, alice); !errors.Is(err, ErrForged) {
		t.Errorf("the rotated minter minted with the previous key: old.Verify = %v, want ErrForged", err)
	}
	clock.t = retired.Add(MaxTTL - time.Millisecond)
	if err := rotated.Verify(tok, alice); err != nil {
		t.Errorf("previous key's token 1ms before retired+MaxTTL: Verify = %v, want nil", err)
	}
	clock.t = retired.Add(MaxTTL)
	if err := rotated.Verify(tok, alice); !errors.Is(err, ErrForged) {
		t.Errorf("previous key's token at retired+MaxTTL: Verify = %v, want ErrForged", err)
	}

	// A previous key retired long ago verifies nothing, whatever the
	// token's own expiry says.
	clock.t = time.Unix(1_700_000_000, 0)
	stale, err := NewMinterWithKeys(Keys{Current: newKey, Previous: oldKey, Retired: retired.Add(-MaxTTL)}, clock.now)
	if err != nil {
		t.Fatal(err)
	}
	if err := stale.Verify(tok, alice); !errors.Is(err, ErrForged) {
		t.Errorf("token of a key retired MaxTTL ago: Verify = %v, want ErrForged", err)
	}
}

func TestNewMinterWithKeysRefusesBadPrevious(t *testing.T) {
	key := bytes.Repeat([]byte{1}, KeySize)
	if _, err := NewMinterWithKeys(Keys{Current: key, Previous: key[:5], Retired: time.Now()}, nil); err == nil {
		t.Error("short previous key accepted")
	}
	if _, err := NewMinterWithKeys(Keys{Current: key, Previous: key}, nil); err == nil {
		t.Error("previous key without a retirement time accepted")
	}
}

func TestKeyFileRoundTrip(t *testing.T) {
	keys := Keys{Current: bytes.Repeat([]byte{0xab}, KeySize), Previous: bytes.Repeat([]byte{0xcd}, KeySize),
		Retired: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	got, err := ParseKeys(FormatKeys(keys))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Current, keys.Current) || !bytes.Equal(got.Previous, keys.Previous) || !got.Retired.Equal(keys.Retired) {
		t.Errorf("round trip: got %+v, want %+v", got, keys)
	}
}

func TestParseKeysRefusesBadFiles(t *testing.T) {
	key := strings.Repeat("ab", KeySize)
	for _, in := range []string{
		"",
		"current " + key + "\n",
		keyFileHeader + "\n",
		keyFileHeader + "\ncurrent " + key[2:] + "\n",
		keyFileHeader + "\ncurrent " + key + "zz\n",
		keyFileHeader + "\ncurrent  " + key + "\n",
		keyFileHeader + "\nprevious " + key + " 2026-01-02T03:04:05Z\n",
		keyFileHeader + "\ncurrent " + key + "\nprevious " + key + "\n",
		keyFileHeader + "\ncurrent " + key + "\nprevious " + key + " yesterday\n",
		keyFileHeader + "\ncurrent " + key + "\nprevious " + key + " 2026-01-02T03:04:05Z\nextra\n",
	} {
		if _, err := ParseKeys([]byte(in)); err == nil {
			t.Errorf("ParseKeys(%q) accepted", in)
		} else if strings.Contains(err.Error(), key[:16]) {
			t.Errorf("ParseKeys(%q) error %q holds key material", in, err)
		}
	}
}

func TestLoadKeyFileCreatesOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token-key")
	first, err := LoadKeyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := info.Mode().Perm(); perm != 0o600 {
		t.Errorf("created with mode %04o, want 0600", perm)
	}
	if len(first.Current) != KeySize || first.Previous != nil {
		t.Errorf("created keys %d bytes, previous %v: want %d bytes, no previous", len(first.Current), first.Previous != nil, KeySize)
	}
	again, err := LoadKeyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first.Current, again.Current) {
		t.Error("a second load made a new key")
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the key file (temporary files removed)", len(entries))
	}
}

func TestLoadKeyFileConcurrentStartsAgree(t *testing.T) {
	for range 20 {
		path := filepath.Join(t.TempDir(), "token-key")
		keys := make([]Keys, 8)
		errs := make([]error, len(keys))
		var wg sync.WaitGroup
		for i := range keys {
			wg.Add(1)
			go func() {
				defer wg.Done()
				keys[i], errs[i] = LoadKeyFile(path)
			}()
		}
		wg.Wait()
		for i := range keys {
			if errs[i] != nil {
				t.Fatalf("load %d: %v", i, errs[i])
			}
			if !bytes.Equal(keys[i].Current, keys[0].Current) {
				t.Fatalf("concurrent loads %d and 0 ended with different keys", i)
			}
		}
	}
}

func TestLoadKeyFileRefuses(t *testing.T) {
	dir := t.TempDir()
	valid := FormatKeys(Keys{Current: bytes.Repeat([]byte{9}, KeySize)})
	write := func(name string, data []byte, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		return p
	}
	for _, c := range []struct {
		name, path, want string
	}{
		{"world-readable", write("open", valid, 0o644), "chmod 600"},
		{"group-readable", write("group", valid, 0o640), "chmod 600"},
		{"wrong format", write("short", []byte("0123"), 0o600), "remove it"},
		{"too large", write("large", bytes.Repeat([]byte{'a'}, maxKeyFileSize+1), 0o600), "larger than"},
		{"missing directory", filepath.Join(dir, "absent", "token-key"), "does not exist"},
		{"directory", dir, "not a regular file"},
	} {
		_, err := LoadKeyFile(c.path)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.path) {
			t.Errorf("%s: LoadKeyFile = %v, want an error naming %s and saying %q", c.name, err, c.path, c.want)
		}
		if err != nil && strings.Contains(err.Error(), strings.Repeat("09", 8)) {
			t.Errorf("%s: error %q holds key material", c.name, err)
		}
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(write("target", valid, 0o600), link); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeyFile(link); err == nil {
		t.Error("a symlink was followed")
	}
}

func TestLoadKeyFileRefusesAnotherOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the file to another user")
	}
	path := filepath.Join(t.TempDir(), "token-key")
	if err := os.WriteFile(path, FormatKeys(Keys{Current: bytes.Repeat([]byte{9}, KeySize)}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, 4242, 4242); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeyFile(path); err == nil || !strings.Contains(err.Error(), "owned by UID 4242") {
		t.Errorf("LoadKeyFile(file of UID 4242) = %v, want a refusal naming the owner", err)
	}
}
