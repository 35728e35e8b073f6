package token

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// A key file holds the signing key, so that tokens outlive the process. It
// is text, one item a line:
//
//	imds-proxy-token-key v1
//	current <64 hex digits: the 32-byte key that mints and verifies>
//	previous <64 hex digits> <RFC 3339 time it was retired>
//
// The previous line is optional. To rotate, replace the file (atomically,
// mode 0600) with a new current key, the old current key as previous and
// the time of the rotation, then restart the proxy: it reads the file at
// start only. Tokens of the previous key verify until its retirement time
// plus MaxTTL; after that the line may be dropped.
const keyFileHeader = "imds-proxy-token-key v1"

// maxKeyFileSize bounds what LoadKeyFile reads; a valid file is ~230 bytes.
const maxKeyFileSize = 4096

// LoadKeyFile returns the keys in the key file at path. If there is none it
// creates one with a fresh random key, mode 0600, atomically: processes
// that start at once all end up with the key of whichever created it first.
// The directory must exist. A file that is not a regular file, is readable
// or writable by group or others, is owned by another user than the
// process's effective UID, or is not in the key file format is refused.
func LoadKeyFile(path string) (Keys, error) {
	keys, err := readKeyFile(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return keys, err
	}
	if err := createKeyFile(path); err != nil {
		return Keys{}, err
	}
	return readKeyFile(path)
}

// NewMinterFromKeyFile returns a Minter keyed from the key file at path
// (LoadKeyFile). now is the clock; nil means time.Now.
func NewMinterFromKeyFile(path string, now func() time.Time) (*Minter, error) {
	keys, err := LoadKeyFile(path)
	if err != nil {
		return nil, err
	}
	m, err := NewMinterWithKeys(keys, now)
	if err != nil {
		return nil, fmt.Errorf("token key file %s: %w", path, err)
	}
	return m, nil
}

// readKeyFile reads and checks an existing key file.
func readKeyFile(path string) (Keys, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return Keys{}, err // not wrapped in words: LoadKeyFile creates it
	}
	if err != nil {
		return Keys{}, fmt.Errorf("token key file %s: %w; it must be a regular file (not a symlink) "+
			"owned by the proxy's user (UID %d) with mode 0600", path, err, os.Geteuid())
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return Keys{}, fmt.Errorf("token key file %s: %w", path, err)
	}
	if !info.Mode().IsRegular() {
		return Keys{}, fmt.Errorf("token key file %s is not a regular file (%s): remove it, and the proxy makes a new key", path, info.Mode().Type())
	}
	if perm := info.Mode().Perm(); perm&0o077 != 0 {
		return Keys{}, fmt.Errorf("token key file %s has mode %04o, open to group or others: run `chmod 600 %s`", path, perm, path)
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return Keys{}, fmt.Errorf("token key file %s is owned by UID %d, but the proxy runs as UID %d: "+
			"run `chown %d %s`, or remove it and the proxy makes a new key", path, st.Uid, os.Geteuid(), os.Geteuid(), path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxKeyFileSize+1))
	if err != nil {
		return Keys{}, fmt.Errorf("reading token key file %s: %w", path, err)
	}
	if len(data) > maxKeyFileSize {
		return Keys{}, fmt.Errorf("token key file %s is larger than %d bytes: it is not a key file", path, maxKeyFileSize)
	}
	keys, err := ParseKeys(data)
	if err != nil {
		return Keys{}, fmt.Errorf("token key file %s: %w; fix it, or remove it and the proxy makes a new key "+
			"(tokens minted with the old one then get 401)", path, err)
	}
	return keys, nil
}

// createKeyFile writes a fresh key to a temporary file beside path and links
// it into place, which fails rather than replace a file another process
// created meanwhile.
func createKeyFile(path string) error {
	key := make([]byte, KeySize)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("reading random token key: %w", err)
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*") // mode 0600
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("creating token key file %s: directory %s does not exist: create it "+
				"(mode 0700, owned by the proxy's user), or mount a volume there", path, dir)
		}
		return fmt.Errorf("creating token key file %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(FormatKeys(Keys{Current: key}))
	if err == nil {
		err = tmp.Sync()
	}
	if closeErr := tmp.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		return fmt.Errorf("writing token key file %s: %w", path, err)
	}
	if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("creating token key file %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // the new name survives a crash of the node
		d.Close()
	}
	return nil
}

// FormatKeys is keys in the key file format.
func FormatKeys(keys Keys) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s\ncurrent %s\n", keyFileHeader, hex.EncodeToString(keys.Current))
	if keys.Previous != nil {
		fmt.Fprintf(&b, "previous %s %s\n", hex.EncodeToString(keys.Previous), keys.Retired.UTC().Format(time.RFC3339))
	}
	return b.Bytes()
}

// ParseKeys parses the key file format. Its errors never hold key material.
func ParseKeys(data []byte) (Keys, error) {
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	if lines[0] != keyFileHeader {
		return Keys{}, fmt.Errorf("the first line is not %q", keyFileHeader)
	}
	var keys Keys
	if len(lines) < 2 || len(lines) > 3 {
		return Keys{}, errors.New(`want a "current" line and at most one "previous" line after the first`)
	}
	fields := strings.Split(lines[1], " ")
	if len(fields) != 2 || fields[0] != "current" {
		return Keys{}, errors.New(`line 2 is not "current" and a key`)
	}
	var err error
	if keys.Current, err = parseKey(fields[1]); err != nil {
		return Keys{}, fmt.Errorf("line 2: %w", err)
	}
	if len(lines) == 3 {
		fields = strings.Split(lines[2], " ")
		if len(fields) != 3 || fields[0] != "previous" {
			return Keys{}, errors.New(`line 3 is not "previous", a key and the time it was retired`)
		}
		if keys.Previous, err = parseKey(fields[1]); err != nil {
			return Keys{}, fmt.Errorf("line 3: %w", err)
		}
		if keys.Retired, err = time.Parse(time.RFC3339, fields[2]); err != nil {
			return Keys{}, fmt.Errorf("line 3: the retirement time is not RFC 3339 (e.g. 2026-01-02T15:04:05Z)")
		}
	}
	return keys, nil
}

func parseKey(s string) ([]byte, error) {
	key, err := hex.DecodeString(s)
	if err != nil || len(key) != KeySize {
		return nil, fmt.Errorf("a key must be %d hex digits", 2*KeySize)
	}
	return key, nil
}
