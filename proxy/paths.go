package proxy

import (
	"errors"
	"fmt"
	"net/url"
	"path"
	"strings"
)

// PathPolicy allows or denies request paths by prefix. Deny wins; a
// non-empty allow list denies everything it does not match. Prefixes match
// whole path segments: "/latest/meta-data/iam" covers "/latest/meta-data/iam"
// and everything below it, not "/latest/meta-data/iamx".
type PathPolicy struct {
	Allow, Deny []string
}

// NewPathPolicy normalises the prefixes and says which ones are unusable.
func NewPathPolicy(allow, deny []string) (PathPolicy, error) {
	var p PathPolicy
	var err error
	if p.Allow, err = normalisePrefixes(allow); err != nil {
		return PathPolicy{}, fmt.Errorf("allowed paths: %w", err)
	}
	if p.Deny, err = normalisePrefixes(deny); err != nil {
		return PathPolicy{}, fmt.Errorf("denied paths: %w", err)
	}
	return p, nil
}

func normalisePrefixes(prefixes []string) ([]string, error) {
	var out []string
	for _, raw := range prefixes {
		if raw = strings.TrimSpace(raw); raw == "" {
			continue
		}
		p, err := NormalisePath(raw)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", raw, err)
		}
		out = append(out, strings.TrimSuffix(p, "/"))
	}
	return out, nil
}

// Allows reports whether the normalised path p may be forwarded.
func (pp PathPolicy) Allows(p string) bool {
	p = strings.TrimSuffix(p, "/")
	for _, prefix := range pp.Deny {
		if underPrefix(p, prefix) {
			return false
		}
	}
	if len(pp.Allow) == 0 {
		return true
	}
	for _, prefix := range pp.Allow {
		if underPrefix(p, prefix) {
			return true
		}
	}
	return false
}

func underPrefix(p, prefix string) bool {
	return prefix == "" || p == prefix || strings.HasPrefix(p, prefix+"/")
}

// errBadPath means a path that cannot be normalised safely.
var errBadPath = errors.New("path is not a clean absolute path")

// NormalisePath decodes percent-encoding once and resolves "//", "/./" and
// "/../", keeping a trailing slash (IMDS distinguishes directories by it).
// Paths that still hold encoded or control characters, backslashes, or a
// decoded '?' or '#' after decoding are refused: IMDS paths never need them,
// and they are how a crafted path would slip past a prefix rule
// ("/latest/user-data%3Fx" is not under "/latest/user-data" to a prefix rule).
func NormalisePath(raw string) (string, error) {
	decoded, err := url.PathUnescape(raw)
	if err != nil || !strings.HasPrefix(decoded, "/") {
		return "", errBadPath
	}
	for _, c := range decoded {
		if c < 0x20 || c == 0x7f || c == '\\' || c == '%' || c == '?' || c == '#' {
			return "", errBadPath
		}
	}
	clean := path.Clean(decoded)
	if strings.HasSuffix(decoded, "/") && clean != "/" {
		clean += "/"
	}
	return clean, nil
}
