package iptables

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"

	goiptables "github.com/coreos/go-iptables/iptables"
)

// Backend is the iptables flavour: the nf_tables one or the legacy one.
type Backend string

// Backends.
const (
	BackendAuto   Backend = "auto"
	BackendNFT    Backend = "nft"
	BackendLegacy Backend = "legacy"
)

// ParseBackend parses the value of --iptables-backend.
func ParseBackend(s string) (Backend, error) {
	switch b := Backend(s); b {
	case BackendAuto, BackendNFT, BackendLegacy:
		return b, nil
	}
	return "", fmt.Errorf("unknown iptables backend %q: want auto, nft or legacy", s)
}

// Table applies one family's ruleset with one iptables binary.
type Table struct {
	ipt         *goiptables.IPTables
	family      Family
	backend     Backend
	restorePath string // empty: apply rule by rule
}

// Open finds the iptables binary for family and backend. With BackendAuto it
// does as Istio does: legacy when the legacy tables already hold rules (the
// host uses legacy), nft otherwise.
func Open(family Family, backend Backend) (*Table, error) {
	if backend == BackendAuto {
		backend = detectBackend(family)
	}
	path, err := binaryPath(family, backend)
	if err != nil {
		return nil, err
	}
	proto := goiptables.ProtocolIPv4
	if family == IPv6 {
		proto = goiptables.ProtocolIPv6
	}
	ipt, err := goiptables.New(goiptables.IPFamily(proto), goiptables.Path(path), goiptables.Timeout(5))
	if err != nil {
		return nil, explain(fmt.Errorf("starting %s: %w", path, err))
	}
	restorePath, _ := exec.LookPath(command(family) + "-" + string(backend) + "-restore")
	return &Table{ipt: ipt, family: family, backend: backend, restorePath: restorePath}, nil
}

// Backend is the backend in use.
func (t *Table) Backend() Backend { return t.backend }

func command(family Family) string {
	if family == IPv6 {
		return "ip6tables"
	}
	return "iptables"
}

func binaryPath(family Family, backend Backend) (string, error) {
	name := command(family) + "-" + string(backend)
	if path, err := exec.LookPath(name); err == nil {
		return path, nil
	}
	if path, err := exec.LookPath(command(family)); err == nil {
		return path, nil
	}
	return "", fmt.Errorf("neither %s nor %s is installed: install the iptables package "+
		"(Debian/Ubuntu: apt-get install iptables; Alpine: apk add iptables ip6tables)", name, command(family))
}

// detectBackend reports legacy when iptables-legacy-save shows any rule.
func detectBackend(family Family) Backend {
	out, err := exec.Command(command(family) + "-legacy-save").Output()
	if err != nil {
		return BackendNFT
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "-A ") {
			return BackendLegacy
		}
	}
	return BackendNFT
}

// Install applies rs: the proxy's chains are (re)filled first and the jumps
// into them added last, so traffic is never sent to a half-built chain.
// Installing twice yields the same ruleset. On failure everything this
// package owns is removed again and the error says what is missing.
func (t *Table) Install(rs Ruleset) error {
	if err := t.install(rs); err != nil {
		err = explain(err)
		if rmErr := t.remove(rs); rmErr != nil {
			err = fmt.Errorf("%w (removing the partial ruleset failed too: %v)", err, rmErr)
		}
		return err
	}
	return nil
}

func (t *Table) install(rs Ruleset) error {
	if t.restorePath != "" {
		return t.restore(rs)
	}
	return t.installEach(rs)
}

// restore applies rs with iptables-restore --noflush: each table changes in
// one transaction, so no packet ever meets half a ruleset.
func (t *Table) restore(rs Ruleset) error {
	present, err := t.existingChains(rs)
	if err != nil {
		return err
	}
	var lookErr error
	input := rs.restoreInput(func(j Rule) bool {
		if !present[jumpTarget(j)] {
			return false
		}
		ok, err := t.ipt.Exists(j.Table, j.Chain, j.Spec...)
		lookErr = errors.Join(lookErr, err)
		return ok
	})
	if lookErr != nil {
		return fmt.Errorf("looking for the jumps: %w", lookErr)
	}
	cmd := exec.Command(t.restorePath, "--noflush", "--wait")
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s --noflush: %w: %s", t.restorePath, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// installEach applies rs rule by rule, chains first and jumps last, where
// no restore binary is available.
func (t *Table) installEach(rs Ruleset) error {
	for _, c := range rs.Chains {
		if err := t.ipt.ClearChain(c.Table, c.Name); err != nil {
			return fmt.Errorf("creating chain %s/%s: %w", c.Table, c.Name, err)
		}
	}
	for _, r := range rs.Rules {
		if err := t.ipt.Append(r.Table, r.Chain, r.Spec...); err != nil {
			return fmt.Errorf("adding rule to %s/%s: %w", r.Table, r.Chain, err)
		}
	}
	for _, j := range rs.Jumps {
		if err := t.ipt.InsertUnique(j.Table, j.Chain, 1, j.Spec...); err != nil {
			return fmt.Errorf("adding jump from %s/%s: %w", j.Table, j.Chain, err)
		}
	}
	return nil
}

// Remove deletes the jumps and the proxy's chains, and nothing else. Removing
// what is not there is not an error.
func (t *Table) Remove(rs Ruleset) error { return explain(t.remove(rs)) }

func (t *Table) remove(rs Ruleset) error {
	present, err := t.existingChains(rs)
	if err != nil {
		return err
	}
	var errs []error
	for _, j := range rs.Jumps {
		// A jump cannot exist without its target chain.
		if present[jumpTarget(j)] {
			errs = append(errs, t.removeJumpsTo(j.Table, j.Chain, jumpTarget(j).Name))
		}
	}
	for _, c := range rs.Chains {
		if !present[c] {
			continue
		}
		if err := t.ipt.ClearAndDeleteChain(c.Table, c.Name); err != nil {
			errs = append(errs, fmt.Errorf("removing chain %s/%s: %w", c.Table, c.Name, err))
		}
	}
	return errors.Join(errs...)
}

// removeJumpsTo deletes every rule of a built-in chain that jumps to target:
// duplicates from racing installs and stale jumps from an earlier
// configuration (another port) too, or the chain could not be deleted.
func (t *Table) removeJumpsTo(table, chain, target string) error {
	rules, err := t.ipt.List(table, chain)
	if err != nil {
		return fmt.Errorf("listing %s/%s: %w", table, chain, err)
	}
	var numbers []int
	n := 0
	for _, r := range rules {
		if !strings.HasPrefix(r, "-A ") {
			continue
		}
		n++
		if strings.HasSuffix(r, " -j "+target) {
			numbers = append(numbers, n)
		}
	}
	for i := len(numbers) - 1; i >= 0; i-- { // from the bottom, so numbers stay valid
		if err := t.ipt.DeleteById(table, chain, numbers[i]); err != nil {
			return fmt.Errorf("removing jump %d from %s/%s: %w", numbers[i], table, chain, err)
		}
	}
	return nil
}

// existingChains reports which of the proxy's chains exist.
func (t *Table) existingChains(rs Ruleset) (map[Chain]bool, error) {
	present := map[Chain]bool{}
	for _, c := range rs.Chains {
		exists, err := t.ipt.ChainExists(c.Table, c.Name)
		if err != nil {
			return nil, fmt.Errorf("looking for chain %s/%s: %w", c.Table, c.Name, err)
		}
		present[c] = exists
	}
	return present, nil
}

// Missing returns the rules of rs that are not in place, in install order.
// Every rule of a deleted chain, and every jump to it, is missing.
func (t *Table) Missing(rs Ruleset) ([]Rule, error) {
	present, err := t.existingChains(rs)
	if err != nil {
		return nil, explain(err)
	}
	var missing []Rule
	// A rule needs the chain it sits in; a jump also needs its target.
	check := func(r Rule, needs Chain) error {
		ok := present[needs]
		if ok {
			var err error
			if ok, err = t.ipt.Exists(r.Table, r.Chain, r.Spec...); err != nil {
				return explain(err)
			}
		}
		if !ok {
			missing = append(missing, r)
		}
		return nil
	}
	for _, r := range rs.Rules {
		if err := check(r, Chain{r.Table, r.Chain}); err != nil {
			return nil, err
		}
	}
	for _, j := range rs.Jumps {
		if err := check(j, jumpTarget(j)); err != nil {
			return nil, err
		}
	}
	return missing, nil
}

// jumpTarget is the proxy chain a jump leads to.
func jumpTarget(j Rule) Chain { return Chain{j.Table, j.Spec[len(j.Spec)-1]} }

// explain adds what to do to the iptables errors an operator will meet.
func explain(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "Permission denied"), strings.Contains(msg, "Operation not permitted"):
		return fmt.Errorf("%w: changing iptables needs the NET_ADMIN capability, and the legacy backend "+
			"NET_RAW too (add them to the container's securityContext.capabilities or "+
			"linuxParameters.capabilities, or run as root)", err)
	case strings.Contains(msg, "Couldn't load match `mark'"), strings.Contains(msg, "Couldn't load match `owner'"),
		strings.Contains(msg, "Couldn't load match `comment'"), strings.Contains(msg, "Couldn't load target `REDIRECT'"):
		return fmt.Errorf("%w: the kernel lacks an iptables extension; load it on the host "+
			"(modprobe xt_mark xt_owner xt_comment xt_REDIRECT) or use --iptables-backend nft", err)
	case strings.Contains(msg, "can't initialize") && strings.Contains(msg, "nat"):
		return fmt.Errorf("%w: the nat table is unavailable; load it on the host (modprobe iptable_nat) "+
			"or try the other --iptables-backend", err)
	}
	return err
}

// Present reports whether any imds-proxy chain exists in this namespace's
// tables of family (auto-detected backend). It needs NET_ADMIN or root.
func Present(family Family) (bool, error) {
	t, err := Open(family, BackendAuto)
	if err != nil {
		return false, err
	}
	for _, c := range []Chain{{"nat", ChainOutput}, {"nat", ChainPrerouting}} {
		ok, err := t.ipt.ChainExists(c.Table, c.Name)
		if err != nil {
			return false, explain(err)
		}
		if ok {
			return true, nil
		}
	}
	return false, nil
}
