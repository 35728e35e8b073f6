package proxy_test

import (
	"fmt"
	"regexp"
	"strings"
	"testing"

	"github.com/imds-proxy/imds-proxy/proxy"
)

// The oracles below are written from NormalisePath's and PathPolicy's
// documentation, independently of paths.go: percent-decoding once, then
// resolving segments one by one.

// oracleUnescape decodes %XX once; a '%' without two hex digits is an error.
func oracleUnescape(s string) (string, bool) {
	hex := func(c byte) (byte, bool) {
		switch {
		case '0' <= c && c <= '9':
			return c - '0', true
		case 'a' <= c && c <= 'f':
			return c - 'a' + 10, true
		case 'A' <= c && c <= 'F':
			return c - 'A' + 10, true
		}
		return 0, false
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b.WriteByte(s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", false
		}
		hi, ok1 := hex(s[i+1])
		lo, ok2 := hex(s[i+2])
		if !ok1 || !ok2 {
			return "", false
		}
		b.WriteByte(hi<<4 | lo)
		i += 2
	}
	return b.String(), true
}

// oracleNormalise is NormalisePath's contract: decode once; refuse a path
// that is not absolute or still holds control characters, DEL, backslashes
// or '%'; drop empty and "." segments, let ".." remove the previous segment
// (never climbing above the root); keep a trailing slash.
func oracleNormalise(raw string) (string, bool) {
	decoded, ok := oracleUnescape(raw)
	if !ok || !strings.HasPrefix(decoded, "/") {
		return "", false
	}
	for i := 0; i < len(decoded); i++ {
		if c := decoded[i]; c < 0x20 || c == 0x7f || c == '\\' || c == '%' || c == '?' || c == '#' {
			return "", false
		}
	}
	var segments []string
	for _, s := range strings.Split(decoded, "/") {
		switch s {
		case "", ".":
		case "..":
			if len(segments) > 0 {
				segments = segments[:len(segments)-1]
			}
		default:
			segments = append(segments, s)
		}
	}
	out := "/" + strings.Join(segments, "/")
	if strings.HasSuffix(decoded, "/") && out != "/" {
		out += "/"
	}
	return out, true
}

// pathSegments splits a clean path into its segments ("/" has none).
func pathSegments(p string) []string {
	if p = strings.Trim(p, "/"); p == "" {
		return nil
	}
	return strings.Split(p, "/")
}

// oracleVersion is the API version syntax of IMDS's root listing: "latest",
// "1.0", or a date such as "2021-07-15".
var oracleVersion = regexp.MustCompile(`^(latest|1\.0|[0-9]{4}-[0-9]{2}-[0-9]{2})$`)

// belowVersionSegments drops the first segment when it names an API version.
func belowVersionSegments(segments []string) []string {
	if len(segments) > 0 && oracleVersion.MatchString(segments[0]) {
		return segments[1:]
	}
	return segments
}

// oracleUsablePrefix says whether the clean prefix may be a policy rule: "/",
// or a path whose first segment is an API version.
func oracleUsablePrefix(clean string) bool {
	s := pathSegments(clean)
	return len(s) == 0 || oracleVersion.MatchString(s[0])
}

// segmentsUnder reports whether the clean path p is prefix or below it,
// segment by segment, comparing what follows the API version segment of
// each: IMDS serves the same tree under every version, so a rule for one
// covers them all.
func segmentsUnder(prefix, p string) bool {
	ps, xs := belowVersionSegments(pathSegments(prefix)), belowVersionSegments(pathSegments(p))
	if len(ps) > len(xs) {
		return false
	}
	for i := range ps {
		if ps[i] != xs[i] {
			return false
		}
	}
	return true
}

// oracleAllows is PathPolicy's contract: deny wins; a non-empty allow list
// refuses what it does not cover.
func oracleAllows(allow, deny []string, p string) bool {
	for _, d := range deny {
		if segmentsUnder(d, p) {
			return false
		}
	}
	if len(allow) == 0 {
		return true
	}
	for _, a := range allow {
		if segmentsUnder(a, p) {
			return true
		}
	}
	return false
}

// hasDotSegment reports whether p has a "." or ".." segment.
func hasDotSegment(p string) bool {
	for _, s := range strings.Split(p, "/") {
		if s == "." || s == ".." {
			return true
		}
	}
	return false
}

// A realistic policy: SDK metadata and the identity document, never
// user-data or credentials.
var (
	realisticAllow = []string{"/latest/meta-data/", "/latest/dynamic/instance-identity/", "/latest/api/token"}
	realisticDeny  = []string{"/latest/user-data", "/latest/meta-data/iam/", "/latest/meta-data/identity-credentials/"}
)

// percentEncodeAll spells every byte of p as %XX, alternating the case of
// the hex digits.
func percentEncodeAll(p string) string {
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		if i%2 == 0 {
			fmt.Fprintf(&b, "%%%02X", p[i])
		} else {
			fmt.Fprintf(&b, "%%%02x", p[i])
		}
	}
	return b.String()
}

// FuzzNormalisePath checks NormalisePath against oracleNormalise for any
// input, the shape of its output (absolute, no "//", no dot segments, a fixed
// point: normalising it again changes nothing), that other spellings of the
// output (percent-encoded, doubled slashes, "." and ".." segments, climbing
// above the root) normalise to it, and that PathPolicy decides by whole
// segments below the API version, ignoring a trailing slash, for a realistic
// policy and for a policy made of the prefix argument (as --deny-path and
// --allow-path are), which is refused unless it is "/" or starts with a
// version.
func FuzzNormalisePath(f *testing.F) {
	realistic, err := proxy.NewPathPolicy(realisticAllow, realisticDeny)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, raw, prefix string) {
		out, err := proxy.NormalisePath(raw)
		want, ok := oracleNormalise(raw)
		if ok != (err == nil) || out != want {
			t.Fatalf("NormalisePath(%q) = %q, %v; the oracle says %q, ok=%v", raw, out, err, want, ok)
		}
		if err != nil {
			return
		}
		if !strings.HasPrefix(out, "/") || strings.Contains(out, "//") || hasDotSegment(out) {
			t.Fatalf("NormalisePath(%q) = %q, which is not clean", raw, out)
		}
		if again, err := proxy.NormalisePath(out); err != nil || again != out {
			t.Fatalf("NormalisePath(%q) = %q, but normalising that gives %q, %v", raw, out, again, err)
		}
		for _, spelling := range []string{
			percentEncodeAll(out),
			strings.ReplaceAll(out, "/", "//"),
			strings.ReplaceAll(out, "/", "/./"),
			"/." + out,
			"/x/.." + out,
			"/.." + out,
			"/%2e%2E" + out,
			"/../../.." + out,
		} {
			if got, err := proxy.NormalisePath(spelling); err != nil || got != out {
				t.Fatalf("%q normalises to %q, but its other spelling %q gives %q, %v", raw, out, spelling, got, err)
			}
		}

		// The realistic policy, and the same decision with or without a
		// trailing slash.
		allowed := realistic.Allows(out)
		if want := oracleAllows(realisticAllow, realisticDeny, out); allowed != want {
			t.Fatalf("realistic policy: Allows(%q) = %v, want %v", out, allowed, want)
		}
		toggled := out + "/"
		if strings.HasSuffix(out, "/") {
			toggled = strings.TrimSuffix(out, "/")
		}
		if toggled != "" && realistic.Allows(toggled) != allowed {
			t.Fatalf("realistic policy: Allows(%q) = %v but Allows(%q) = %v", out, allowed, toggled, !allowed)
		}

		// A policy made of the prefix argument, as a deny and as an allow list.
		deny, derr := proxy.NewPathPolicy(nil, []string{prefix})
		allow, aerr := proxy.NewPathPolicy([]string{prefix}, nil)
		trimmed := strings.TrimSpace(prefix)
		if trimmed == "" {
			if derr != nil || aerr != nil || !deny.Allows(out) || !allow.Allows(out) {
				t.Fatalf("blank prefix %q: %v, %v; a policy of nothing must allow %q", prefix, derr, aerr, out)
			}
			return
		}
		clean, ok := oracleNormalise(trimmed)
		ok = ok && oracleUsablePrefix(clean)
		if ok != (derr == nil) || ok != (aerr == nil) {
			t.Fatalf("prefix %q: NewPathPolicy errors %v, %v; the oracle says usable=%v", prefix, derr, aerr, ok)
		}
		if !ok {
			return
		}
		under := segmentsUnder(clean, out)
		if deny.Allows(out) == under || allow.Allows(out) != under {
			t.Fatalf("prefix %q (%q) and path %q: deny list allows=%v, allow list allows=%v; want the path under the prefix=%v",
				prefix, clean, out, deny.Allows(out), allow.Allows(out), under)
		}
		below := strings.TrimSuffix(clean, "/") + "/child"
		if deny.Allows(clean) || deny.Allows(below) || !allow.Allows(clean) || !allow.Allows(below) {
			t.Fatalf("prefix %q (%q): does not cover itself or %q", prefix, clean, below)
		}
		// A bare version covers every path, a sibling of its name included.
		if sibling := strings.TrimSuffix(clean, "/") + "x"; len(pathSegments(clean)) > 1 && (!deny.Allows(sibling) || allow.Allows(sibling)) {
			t.Fatalf("prefix %q (%q) covers %q: prefixes must match whole segments", prefix, clean, sibling)
		}
	})
}
