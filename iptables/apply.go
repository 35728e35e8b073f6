package iptables

import (
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"

	goiptables "github.com/coreos/go-iptables/iptables"
	"github.com/imds-proxy/imds-proxy/imdsapi"
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
	// mode decides which foreign rules may stand above a jump (see Check);
	// the zero value allows none.
	mode imdsapi.Mode
	// built is what iptables -S printed right after the last install: the
	// rules of each of the proxy's chains, and the jump heading each
	// built-in chain. It is the form Check compares against, whatever
	// spelling iptables gives a rule (a mark's mask, a cgroup path).
	built map[Chain][]string
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

// Install applies rs: the proxy's chains are (re)filled first and each jump
// into them heads its built-in chain as Check wants, so traffic is never
// sent to a half-built chain and no other rule decides before the proxy's.
// Installing twice yields the same ruleset. On failure everything this
// package owns is removed again and the error says what is missing.
func (t *Table) Install(rs Ruleset) error {
	if err := t.reinstall(rs); err != nil {
		if rmErr := t.remove(rs); rmErr != nil {
			err = fmt.Errorf("%w (removing the partial ruleset failed too: %v)", err, rmErr)
		}
		return err
	}
	return nil
}

// reinstall applies rs over whatever is in place and records what iptables
// then prints. It removes nothing on failure: a repair that fails keeps
// what still captures.
func (t *Table) reinstall(rs Ruleset) error {
	var err error
	if t.restorePath != "" {
		err = t.restore(rs)
	} else {
		err = t.installEach(rs)
	}
	if err == nil {
		err = t.record(rs)
	}
	return explain(err)
}

// restore applies rs with iptables-restore --noflush: each table changes in
// one transaction, so no packet ever meets half a ruleset. A jump that is
// not placed as Check wants is inserted first, and every jump to its chain
// already there is deleted in the same transaction, so moving it up never
// opens a gap.
func (t *Table) restore(rs Ruleset) error {
	present, err := t.existingChains(rs)
	if err != nil {
		return err
	}
	placed := map[Chain]bool{}
	deletes := map[string][]string{}
	for _, j := range rs.Jumps {
		if !present[jumpTarget(j)] {
			continue // a jump cannot exist without its target chain
		}
		ok, err := t.placed(j)
		if err != nil {
			return err
		}
		if placed[Chain{j.Table, j.Chain}] = ok; ok {
			continue
		}
		_, lines, err := t.jumpsTo(j.Table, j.Chain, jumpTarget(j).Name)
		if err != nil {
			return err
		}
		for _, line := range lines {
			// iptables -S prints a rule as "-A CHAIN spec", which restore
			// deletes as "-D CHAIN spec".
			deletes[j.Table] = append(deletes[j.Table], "-D"+strings.TrimPrefix(line, "-A"))
		}
	}
	input := withDeletes(rs.restoreInput(func(j Rule) bool { return placed[Chain{j.Table, j.Chain}] }), deletes)
	cmd := exec.Command(t.restorePath, "--noflush", "--wait=5") // bounded: a container that holds the xtables lock must not stall reconcile
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
		ok, err := t.placed(j)
		if err != nil {
			return err
		}
		if ok {
			continue
		}
		// The new jump goes in first and the old ones out after, so IMDS
		// traffic is captured all along.
		if err := t.ipt.Insert(j.Table, j.Chain, 1, j.Spec...); err != nil {
			return fmt.Errorf("adding jump from %s/%s: %w", j.Table, j.Chain, err)
		}
		if err := t.removeJumpsTo(j.Table, j.Chain, jumpTarget(j).Name, 1); err != nil {
			return err
		}
	}
	return nil
}

// withDeletes adds each table's delete lines to restore input, ahead of the
// table's first rule command and after its chain declarations.
func withDeletes(input string, deletes map[string][]string) string {
	var b strings.Builder
	table, done := "", map[string]bool{}
	for _, line := range strings.SplitAfter(input, "\n") {
		if name, ok := strings.CutPrefix(line, "*"); ok {
			table = strings.TrimSpace(name)
		} else if strings.HasPrefix(line, "-") && !done[table] {
			done[table] = true
			for _, d := range deletes[table] {
				b.WriteString(d + "\n")
			}
		}
		b.WriteString(line)
	}
	return b.String()
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
			errs = append(errs, t.removeJumpsTo(j.Table, j.Chain, jumpTarget(j).Name, 0))
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

// removeJumpsTo deletes every rule of a built-in chain that jumps to target,
// except rule number keep (0: none): duplicates from racing installs and
// stale jumps from an earlier configuration (another port) too, or the
// chain could not be deleted.
func (t *Table) removeJumpsTo(table, chain, target string, keep int) error {
	numbers, _, err := t.jumpsTo(table, chain, target)
	if err != nil {
		return err
	}
	for i := len(numbers) - 1; i >= 0; i-- { // from the bottom, so numbers stay valid
		if numbers[i] == keep {
			continue
		}
		if err := t.ipt.DeleteById(table, chain, numbers[i]); err != nil {
			return fmt.Errorf("removing jump %d from %s/%s: %w", numbers[i], table, chain, err)
		}
	}
	return nil
}

// jumpsTo returns the rules of chain that jump to target: their numbers
// (from 1) and their iptables -S lines.
func (t *Table) jumpsTo(table, chain, target string) ([]int, []string, error) {
	rules, err := t.rules(table, chain)
	if err != nil {
		return nil, nil, err
	}
	var numbers []int
	var lines []string
	for i, r := range rules {
		if ruleTarget(r) == target {
			numbers = append(numbers, i+1)
			lines = append(lines, r)
		}
	}
	return numbers, lines, nil
}

// rules lists the rules of chain as iptables -S prints them, in order.
func (t *Table) rules(table, chain string) ([]string, error) {
	lines, err := t.ipt.List(table, chain)
	if err != nil {
		return nil, fmt.Errorf("listing %s/%s: %w", table, chain, err)
	}
	var rules []string
	for _, line := range lines {
		if strings.HasPrefix(line, "-A ") {
			rules = append(rules, line)
		}
	}
	return rules, nil
}

// ruleTarget is the chain or target an iptables -S line jumps or goes to.
// The last -j or -g counts: a comment before it may hold any text.
func ruleTarget(line string) string {
	fields := strings.Fields(line)
	for i := len(fields) - 2; i >= 0; i-- {
		if fields[i] == "-j" || fields[i] == "-g" {
			return fields[i+1]
		}
	}
	return ""
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

// record reads back what iptables prints for rs just installed: the form
// Check holds the rules to from now on. Each of the proxy's chains must hold
// exactly its rules, in order, and each jump must stand where Check wants
// it: first, or where it was left in place; anything else means another
// program changed them meanwhile.
func (t *Table) record(rs Ruleset) error {
	built := map[Chain][]string{}
	for _, c := range rs.Chains {
		lines, err := t.rules(c.Table, c.Name)
		if err != nil {
			return err
		}
		var want []Rule
		for _, r := range rs.Rules {
			if (Chain{r.Table, r.Chain}) == c {
				want = append(want, r)
			}
		}
		same := len(lines) == len(want)
		for i := 0; same && i < len(want); i++ {
			same = printedAs(want[i], lines[i])
		}
		if !same {
			return fmt.Errorf("%s/%s does not read back as just installed (another program changed it meanwhile?): %q",
				c.Table, c.Name, lines)
		}
		built[c] = lines
	}
	for _, j := range rs.Jumps {
		builtin := Chain{j.Table, j.Chain}
		lines, err := t.rules(j.Table, j.Chain)
		if err != nil {
			return err
		}
		at := 0
		if prev := t.built[builtin]; prev != nil && slices.Contains(lines, prev[0]) {
			at = slices.Index(lines, prev[0]) // left in place
		}
		if at >= len(lines) || !printedAs(j, lines[at]) {
			return fmt.Errorf("the jump to %s is not in %s/%s just after installing it "+
				"(another program changed the chain meanwhile?)", jumpTarget(j).Name, j.Table, j.Chain)
		}
		built[builtin] = lines[at : at+1]
	}
	t.built = built
	for _, j := range rs.Jumps {
		drifts, err := t.jumpDrifts(j, true)
		if err != nil {
			return err
		}
		if len(drifts) > 0 {
			return fmt.Errorf("rule %d of %s/%s, %s, stands above the jump just installed "+
				"(another program changed the chain meanwhile?)", drifts[0].Position, j.Table, j.Chain, drifts[0].Rule)
		}
	}
	return nil
}

// printedAs reports whether an iptables -S line is r: same chain, same
// target, same comment. iptables prints some matches its own way (a mark's
// mask, a cgroup path), so the rest is not compared here.
func printedAs(r Rule, line string) bool {
	if !strings.HasPrefix(line, "-A "+r.Chain+" ") || ruleTarget(line) != r.Spec[slices.Index(r.Spec, "-j")+1] {
		return false
	}
	i := slices.Index(r.Spec, "--comment")
	// iptables -S escapes quotes in comments with a backslash.
	return i < 0 || strings.Contains(strings.ReplaceAll(line, `\`, ""), r.Spec[i+1])
}

// DriftKind is how an installed rule differs from what was built.
type DriftKind string

// Drift kinds.
const (
	// DriftMissing: a rule, a jump or a whole chain of the proxy's is gone.
	DriftMissing DriftKind = "missing"
	// DriftForeign: another program's rule sits inside a proxy chain, or
	// above a jump where it can decide IMDS traffic's fate first.
	DriftForeign DriftKind = "foreign"
	// DriftOrder: the proxy's rules are all there, in another order.
	DriftOrder DriftKind = "order"
)

// Drift is one difference that can keep the rules from capturing IMDS
// traffic.
type Drift struct {
	Kind         DriftKind
	Table, Chain string
	// Position is the rule's number in Chain (iptables -S order, from 1);
	// 0 for a missing rule.
	Position int
	// Rule is the rule as iptables -S prints it.
	Rule string
}

// Check compares the rules in place with those the last install left: each
// jump must come first in its built-in chain, and each of the proxy's chains
// must hold exactly its rules, in order. In node mode a jump may follow
// other programs' jumps into their own chains: CNIs (Calico) and kube-proxy
// hook the host's built-in chains that way and keep their hooks first, so
// insisting on the top would make the two fight every reconcile. A foreign
// verdict (ACCEPT, RETURN, DNAT...) above a jump is a drift in every mode,
// and so is any foreign rule above the sidecar's jump.
func (t *Table) Check(rs Ruleset) ([]Drift, error) {
	if t.built == nil {
		return nil, errors.New("checking rules this table never installed")
	}
	present, err := t.existingChains(rs)
	if err != nil {
		return nil, explain(err)
	}
	var drifts []Drift
	for _, j := range rs.Jumps {
		found, err := t.jumpDrifts(j, present[jumpTarget(j)])
		if err != nil {
			return nil, explain(err)
		}
		drifts = append(drifts, found...)
	}
	for _, c := range rs.Chains {
		var lines []string
		if present[c] {
			if lines, err = t.rules(c.Table, c.Name); err != nil {
				return nil, explain(err)
			}
		}
		drifts = append(drifts, diffChain(c, t.built[c], lines)...)
	}
	return drifts, nil
}

// placed reports whether jump j stands as Check wants it, as last
// installed: then a reinstall leaves it alone.
func (t *Table) placed(j Rule) (bool, error) {
	if t.built == nil {
		return false, nil
	}
	drifts, err := t.jumpDrifts(j, true)
	return len(drifts) == 0, err
}

// jumpDrifts lists what keeps jump j from deciding IMDS traffic first in its
// built-in chain: the jump gone (or its target chain), or the foreign rules
// above it that Check does not allow there.
func (t *Table) jumpDrifts(j Rule, targetPresent bool) ([]Drift, error) {
	jump := t.built[Chain{j.Table, j.Chain}][0]
	lines, err := t.rules(j.Table, j.Chain)
	if err != nil {
		return nil, err
	}
	at := slices.Index(lines, jump)
	if at < 0 || !targetPresent {
		return []Drift{{Kind: DriftMissing, Table: j.Table, Chain: j.Chain, Rule: jump}}, nil
	}
	var hooks []string
	if t.mode == imdsapi.ModeNode && at > 0 {
		if hooks, err = t.ipt.ListChains(j.Table); err != nil {
			return nil, fmt.Errorf("listing the chains of %s: %w", j.Table, err)
		}
	}
	var drifts []Drift
	for i, line := range lines[:at] {
		if !slices.Contains(hooks, ruleTarget(line)) {
			drifts = append(drifts, Drift{Kind: DriftForeign, Table: j.Table, Chain: j.Chain, Position: i + 1, Rule: line})
		}
	}
	return drifts, nil
}

// diffChain lists how the rules of c differ from built: foreign rules with
// their positions, built rules that are gone, or else, when the same rules
// stand in another order, the first position that differs.
func diffChain(c Chain, built, lines []string) []Drift {
	var drifts []Drift
	unmatched := slices.Clone(built)
	for i, line := range lines {
		if k := slices.Index(unmatched, line); k >= 0 {
			unmatched = slices.Delete(unmatched, k, k+1)
			continue
		}
		drifts = append(drifts, Drift{Kind: DriftForeign, Table: c.Table, Chain: c.Name, Position: i + 1, Rule: line})
	}
	for _, line := range unmatched {
		drifts = append(drifts, Drift{Kind: DriftMissing, Table: c.Table, Chain: c.Name, Rule: line})
	}
	if len(drifts) == 0 && !slices.Equal(built, lines) {
		for i := range lines {
			if lines[i] != built[i] {
				return []Drift{{Kind: DriftOrder, Table: c.Table, Chain: c.Name, Position: i + 1, Rule: lines[i]}}
			}
		}
	}
	return drifts
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
	case strings.Contains(msg, "Couldn't load match `cgroup'"), strings.Contains(msg, "-m cgroup") && strings.Contains(msg, "Invalid argument"):
		return fmt.Errorf("%w: the kernel cannot match the proxy's cgroup (xt_cgroup, cgroup v2); load it on the host "+
			"(modprobe xt_cgroup), or start with --exempt-cgroup off (the socket-mark exemption, which app containers "+
			"with NET_RAW can forge)", err)
	case strings.Contains(msg, "can't initialize") && strings.Contains(msg, "nat"):
		return fmt.Errorf("%w: the nat table is unavailable; load it on the host (modprobe iptable_nat) "+
			"or try the other --iptables-backend", err)
	}
	return err
}

// installedChain lists (iptables -S) the proxy's nat chain named chain in
// this namespace's IPv4 tables (auto-detected backend), or returns nil
// when there is none. It needs NET_ADMIN or root.
func installedChain(chain string) ([]string, error) {
	t, err := Open(IPv4, BackendAuto)
	if err != nil {
		return nil, err
	}
	ok, err := t.ipt.ChainExists("nat", chain)
	if err != nil || !ok {
		return nil, explain(err)
	}
	lines, err := t.ipt.List("nat", chain)
	if err != nil {
		return nil, explain(err)
	}
	return lines, nil
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
