package proxy

import (
	"errors"
	"fmt"
	"net/url"
	"path"
	"strings"
)

// PathPolicy allows or denies request paths by prefix, in every API version.
// IMDS serves the same tree under "/latest/", "/1.0/" and each dated version
// ("/2021-07-15/"), and lists the versions at "/". A prefix is written as a
// path of one version ("/latest/user-data"), and the policy compares what
// follows the version segment, so that prefix covers "/2009-04-04/user-data"
// too. A request path whose first segment is no version is compared whole,
// so a rule still covers it ("/meta-data/iam/info", which IMDS answers 404).
// The root listing "/" and a version's own listing are under the empty part,
// which only "/" and a bare version ("/latest") cover. Deny wins; a non-empty
// allow list denies everything it does not match. Prefixes match whole
// segments: "/latest/meta-data/iam" covers "/latest/meta-data/iam" and
// everything below it, not "/latest/meta-data/iamx".
type PathPolicy struct {
	// allow and deny hold each prefix's part below its version, without a
	// trailing slash ("/user-data"; "" for the whole tree).
	allow, deny []string
}

// errNoVersion means a policy prefix that names no API version. Reading it
// as version-agnostic would let a misspelt version ("/lastest/user-data")
// become a rule that matches nothing.
var errNoVersion = errors.New(`a path prefix starts with an API version, such as /latest/ or /2021-07-15/ ` +
	`(it then covers that path under every version), or is / for every path`)

// NewPathPolicy normalises the prefixes and says which ones are unusable.
func NewPathPolicy(allow, deny []string) (PathPolicy, error) {
	var p PathPolicy
	var err error
	if p.allow, err = normalisePrefixes(allow); err != nil {
		return PathPolicy{}, fmt.Errorf("allowed paths: %w", err)
	}
	if p.deny, err = normalisePrefixes(deny); err != nil {
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
		below, versioned := belowVersion(p)
		if !versioned && p != "/" {
			return nil, fmt.Errorf("%q: %w", raw, errNoVersion)
		}
		out = append(out, below)
	}
	return out, nil
}

// Allows reports whether the normalised path p may be forwarded.
func (pp PathPolicy) Allows(p string) bool {
	p, _ = belowVersion(p)
	for _, prefix := range pp.deny {
		if underPrefix(p, prefix) {
			return false
		}
	}
	if len(pp.allow) == 0 {
		return true
	}
	for _, prefix := range pp.allow {
		if underPrefix(p, prefix) {
			return true
		}
	}
	return false
}

// roleCredentialsPath says whether the normalised path p is the node
// role's credentials (meta-data/iam/security-credentials), in any API
// version.
func roleCredentialsPath(p string) bool {
	below, versioned := belowVersion(p)
	return versioned && underPrefix(below, roleCredentialsDir)
}

func underPrefix(p, prefix string) bool {
	return prefix == "" || p == prefix || strings.HasPrefix(p, prefix+"/")
}

// belowVersion returns the part of the clean path p after its API version
// segment, without a trailing slash: "/2021-07-15/meta-data/iam/" gives
// "/meta-data/iam", and "/latest" and "/" give "". A path whose first segment
// is no version is returned whole, less a trailing slash, with versioned false.
func belowVersion(p string) (below string, versioned bool) {
	p = strings.TrimSuffix(p, "/")
	first, rest, _ := strings.Cut(strings.TrimPrefix(p, "/"), "/")
	if !isAPIVersion(first) {
		return p, false
	}
	if rest == "" {
		return "", true
	}
	return "/" + rest, true
}

// isAPIVersion says whether segment has the syntax of the versions IMDS lists
// at "/": "latest", "1.0", or a date such as "2021-07-15". Any date is taken,
// not only those IMDS lists today, so a rule covers versions added later.
func isAPIVersion(segment string) bool {
	if segment == "latest" || segment == "1.0" {
		return true
	}
	if len(segment) != len("2006-01-02") {
		return false
	}
	for i := 0; i < len(segment); i++ {
		if c := segment[i]; i == 4 || i == 7 {
			if c != '-' {
				return false
			}
		} else if c < '0' || c > '9' {
			return false
		}
	}
	return true
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
