package inject

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	sigsjson "sigs.k8s.io/json"
)

// RulesContainerName names the init container of the variant in
// deploy/kubernetes/sidecar-init that installs the redirect for a sidecar
// without NET_ADMIN.
const RulesContainerName = "imds-proxy-rules"

// existing is a sidecar that a pod already has and that is exactly one of
// the two this package knows: Container, first among the init containers,
// or the sidecar-init variant (rulesContainer, then unprivilegedSidecar).
type existing struct {
	index     int              // of the sidecar among the init containers
	v1        imdsapi.V1Policy // its --v1
	v1Arg     int              // where --v1 is in its args
	exemptUID *int64           // the variant's UID whose traffic the redirect lets through
}

// containers are the init containers that make up the sidecar: the
// variant's rules container comes first.
func (e existing) containers() []int {
	if e.exemptUID != nil {
		return []int{0, e.index}
	}
	return []int{e.index}
}

// v1Arg finds a sidecar's --v1 argument in args (its "args" or "command",
// named by where): its index and policy, or why there is none to read.
func v1Arg(args []string, where string) (index int, policy imdsapi.V1Policy, why string) {
	index = slices.IndexFunc(args, func(a string) bool { return strings.HasPrefix(a, "--v1=") })
	if index < 0 {
		return index, "", "no --v1 in its " + where
	}
	policy, err := imdsapi.ParseV1Policy(strings.TrimPrefix(args[index], "--v1="))
	if err != nil {
		return index, "", fmt.Sprintf("its --v1: %v", err)
	}
	return index, policy, ""
}

// recognise finds the pod's container named ContainerName. A pod author
// can name any container so, and write any annotation, so a sidecar is
// told by its whole spec, never by its name: found is true if the pod has
// a container of that name, and why says how it is not the sidecar ("" if
// it is).
func recognise(spec *podSpec, o Options) (e existing, found bool, why string) {
	if slices.ContainsFunc(spec.Containers, func(c podContainer) bool { return c.Name == ContainerName }) {
		return e, true, "an app container"
	}
	e.index = slices.IndexFunc(spec.InitContainers, func(c podContainer) bool { return c.Name == ContainerName })
	if e.index < 0 {
		return e, false, ""
	}
	sidecar := spec.InitContainers[e.index]
	var policy imdsapi.V1Policy
	if e.v1Arg, policy, why = v1Arg(sidecar.Args, "args"); why != "" {
		return e, true, why
	}
	e.v1 = policy
	withV1 := o.withCredentials(sidecar.Args, spec)
	withV1.V1 = policy
	switch {
	case e.index == 0:
		if path := differs(sidecar.raw, Container(withV1)); path != "" {
			return e, true, "it differs from the sidecar at " + path
		}
	case e.index == 1 && spec.InitContainers[0].Name == RulesContainerName:
		rules := spec.InitContainers[0]
		uid, ok := exemptUID(rules.Args)
		switch {
		case !ok:
			return e, true, "its " + RulesContainerName + " container exempts no UID above 0"
		case uid != o.ExemptUID:
			// The exempt UID reaches IMDS directly: a pod's author who
			// chose it could run the app as it.
			return e, true, fmt.Sprintf("its %s container exempts UID %d, not --exempt-uid=%d", RulesContainerName, uid, o.ExemptUID)
		}
		if path := differs(rules.raw, rulesContainer(o)); path != "" {
			return e, true, "its " + RulesContainerName + " container differs from the variant's at " + path
		}
		if path := differs(sidecar.raw, unprivilegedSidecar(withV1)); path != "" {
			return e, true, "it differs from the sidecar-init variant at " + path
		}
		e.exemptUID = &o.ExemptUID
	default:
		return e, true, "not the first init container, so those before it run unredirected"
	}
	for _, v := range spec.Volumes {
		if v.Name == RunVolumeName {
			if path := differs(v.raw, RunVolume()); path != "" {
				return e, true, "its volume " + RunVolumeName + " differs at " + path
			}
			return e, true, ""
		}
	}
	return e, true, "no volume " + RunVolumeName
}

// withCredentials is o with the --credentials and --workload-role-arn of a
// sidecar's args (the role it serves), and, for the workload's own role,
// the pod's credential source: what a sidecar injected for it would have.
func (o Options) withCredentials(args []string, spec *podSpec) Options {
	o.Credentials, o.WorkloadRoleARN, o.source = "", "", credentialSource{}
	if v, _ := argValue(args, "--credentials"); v == string(imdsapi.CredentialsWorkload) {
		o.Credentials = imdsapi.CredentialsWorkload
	}
	o.WorkloadRoleARN, _ = argValue(args, "--workload-role-arn")
	if o.Credentials == imdsapi.CredentialsWorkload && spec != nil {
		o.source, _ = credentialSourceOf(spec)
	}
	return o
}

// otherRole notes a sidecar that is kept as it is although it serves
// another role than asked, or is "" where it serves the one asked.
func otherRole(has, asked Options) string {
	if has.role() == asked.role() {
		return ""
	}
	return fmt.Sprintf("its %s sidecar serves %s, not the one asked for (%s): it is kept as it is; remove it to have the one asked for injected",
		ContainerName, has.role(), asked.role())
}

// role names the role the sidecar of o serves.
func (o Options) role() string {
	switch {
	case o.Credentials != imdsapi.CredentialsWorkload:
		return "the instance's role"
	case o.WorkloadRoleARN != "":
		return "the workload's role " + o.WorkloadRoleARN
	}
	return "the workload's role"
}

// argValue is the value of the first --flag=value of args.
func argValue(args []string, flag string) (string, bool) {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, flag+"="); ok {
			return v, true
		}
	}
	return "", false
}

// exemptUID is the --exempt-uid=N of args, if N > 0: exempting root would
// let every root process past the redirect.
func exemptUID(args []string) (int64, bool) {
	v, ok := argValue(args, "--exempt-uid")
	if !ok {
		return 0, false
	}
	uid, err := strconv.ParseInt(v, 10, 64)
	return uid, err == nil && uid > 0
}

// rulesContainer is the init container of deploy/kubernetes/sidecar-init:
// it installs the redirect exempting o.ExemptUID, as root with NET_ADMIN
// and NET_RAW, and exits. deploy's TestWebhookRecognisesTheExampleSidecars
// checks that the example is this.
func rulesContainer(o Options) ContainerSpec {
	root, no, yes := int64(0), false, true
	c := Container(o)
	return ContainerSpec{
		Name:  RulesContainerName,
		Image: o.Image,
		Args: []string{"rules", "install", "--mode=sidecar", "--port=" + strconv.Itoa(o.Port),
			"--exempt-uid=" + strconv.FormatInt(o.ExemptUID, 10), "--exempt-mark=0"},
		Resources:    c.Resources,
		VolumeMounts: c.VolumeMounts,
		SecurityContext: &SecurityContext{
			Capabilities:             c.SecurityContext.Capabilities,
			Privileged:               &no,
			RunAsUser:                &root,
			RunAsNonRoot:             &no,
			ReadOnlyRootFilesystem:   &yes,
			AllowPrivilegeEscalation: &no,
		},
	}
}

// unprivilegedSidecar is the sidecar of deploy/kubernetes/sidecar-init: the
// injected one without rules or capabilities, running as o.ExemptUID. It
// mounts the emptyDir at /run for its --token-key-file only.
func unprivilegedSidecar(o Options) ContainerSpec {
	no, yes, uid := false, true, o.ExemptUID
	c := Container(o)
	c.Args = slices.Insert(c.Args, 1, "--rules=false")
	c.SecurityContext = &SecurityContext{
		Capabilities:             &Capabilities{Drop: []string{"ALL"}},
		Privileged:               &no,
		RunAsUser:                &uid,
		RunAsGroup:               &uid,
		RunAsNonRoot:             &yes,
		ReadOnlyRootFilesystem:   &yes,
		AllowPrivilegeEscalation: &no,
	}
	return c
}

// differs compares got, an object as the API server or ECS hands it over,
// with want, what this package would write, and names the first field that
// differs ("" if none does). got may also hold fields that are empty or
// that the API server fills in (apiDefault): the API server defaults a pod
// before admission, and `aws ecs describe-task-definition` prints empty
// fields.
func differs(got json.RawMessage, want any) string {
	raw, err := json.Marshal(want)
	if err != nil {
		return "encoding" // cannot happen: want is one of this package's types
	}
	var g, w any
	if sigsjson.UnmarshalCaseSensitivePreserveInts(got, &g) != nil || sigsjson.UnmarshalCaseSensitivePreserveInts(raw, &w) != nil {
		return "encoding"
	}
	return differsAt("", g, w)
}

func differsAt(path string, got, want any) string {
	switch w := want.(type) {
	case map[string]any:
		g, ok := got.(map[string]any)
		if !ok {
			return orSelf(path)
		}
		keys := make([]string, 0, len(g)+len(w))
		for k := range g {
			keys = append(keys, k)
		}
		for k := range w {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range slices.Compact(keys) {
			at := k
			if path != "" {
				at = path + "." + k
			}
			wv, inWant := w[k]
			gv := g[k]
			switch {
			case inWant:
				if d := differsAt(at, gv, wv); d != "" {
					return d
				}
			case !empty(gv) && !apiDefault(at, gv):
				return at
			}
		}
		return ""
	case []any:
		g, ok := got.([]any)
		if !ok || len(g) != len(w) {
			return orSelf(path)
		}
		for i := range w {
			if d := differsAt(path, g[i], w[i]); d != "" {
				return d
			}
		}
		return ""
	}
	if got != want {
		return orSelf(path)
	}
	return ""
}

func orSelf(path string) string {
	if path == "" {
		return "spec"
	}
	return path
}

func empty(v any) bool {
	switch v := v.(type) {
	case nil:
		return true
	case bool:
		return !v
	case string:
		return v == ""
	case int64:
		return v == 0
	case float64:
		return v == 0
	case []any:
		return len(v) == 0
	case map[string]any:
		return len(v) == 0
	}
	return false
}

// apiDefault says whether v at path is what the API server fills in for a
// container that does not say: the sidecar's spec leaves these out.
func apiDefault(path string, v any) bool {
	switch path {
	case "imagePullPolicy":
		return true // the node's cache, not what runs
	case "terminationMessagePath":
		return v == "/dev/termination-log"
	case "terminationMessagePolicy":
		return v == "File"
	case "startupProbe.successThreshold", "livenessProbe.successThreshold":
		return v == int64(1)
	case "startupProbe.httpGet.scheme", "livenessProbe.httpGet.scheme":
		return v == "HTTP"
	}
	return false
}

// bypasses names the containers of a pod with the sidecar that could reach
// IMDS around it, and how; skip says which init containers are the proxy's.
func bypasses(spec *podSpec, exempt *int64, skip ...int) []string {
	var out []string
	check := func(c podContainer) {
		if finding := netAdminBypass(c.Name, c.SecurityContext); finding != "" {
			out = append(out, finding)
		}
		if exempt == nil {
			return
		}
		if how := canBecome(spec, c, *exempt); how != "" {
			out = append(out, fmt.Sprintf("container %s can become UID %d, which the redirect exempts: %s; "+
				"set runAsUser (not %d), allowPrivilegeEscalation: false, drop ALL capabilities", c.Name, *exempt, how, *exempt))
		}
	}
	for i, c := range spec.InitContainers {
		if !slices.Contains(skip, i) {
			check(c)
		}
	}
	for _, c := range spec.Containers {
		check(c)
	}
	return out
}

// netAdminBypass says how container name, running with sc, could reach
// IMDS around the sidecar, or "" if it holds no NET_ADMIN.
func netAdminBypass(name string, sc *SecurityContext) string {
	if how := holdsNetAdmin(sc); how != "" {
		return fmt.Sprintf("container %s %s: it can remove the redirect, or mark its connections as the proxy's, and reach IMDS directly", name, how)
	}
	return ""
}

func holdsNetAdmin(sc *SecurityContext) string {
	if sc == nil {
		return ""
	}
	if sc.Privileged != nil && *sc.Privileged {
		return "is privileged"
	}
	if sc.Capabilities != nil && slices.ContainsFunc(sc.Capabilities.Add, func(c string) bool { return capIs(c, "NET_ADMIN") }) {
		return "adds NET_ADMIN"
	}
	return ""
}

// capIs matches a capability as Kubernetes names it, with or without CAP_,
// or ALL.
func capIs(c, name string) bool {
	c = strings.TrimPrefix(strings.ToUpper(c), "CAP_")
	return c == name || c == "ALL"
}

// canBecome says how container c could run as uid, or "" if it cannot: it
// must run as a known UID other than uid, without privilege escalation
// (which setuid programs in its image would give it), and, as root,
// without CAP_SETUID.
func canBecome(spec *podSpec, c podContainer, uid int64) string {
	sc := c.SecurityContext
	if sc == nil {
		sc = &SecurityContext{}
	}
	runAs := sc.RunAsUser
	if runAs == nil && spec.SecurityContext != nil {
		runAs = spec.SecurityContext.RunAsUser
	}
	switch {
	case runAs != nil && *runAs == uid:
		return fmt.Sprintf("it runs as %d", uid)
	case sc.Privileged != nil && *sc.Privileged:
		return "it is privileged"
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		return "allowPrivilegeEscalation is not false (setuid programs)"
	case runAs == nil:
		return "runAsUser is unset (the image's user decides)"
	case *runAs == 0 && !dropsSetuid(sc.Capabilities):
		return "it runs as root with CAP_SETUID"
	}
	return ""
}

func dropsSetuid(caps *Capabilities) bool {
	if caps == nil || slices.ContainsFunc(caps.Add, func(c string) bool { return capIs(c, "SETUID") }) {
		return false
	}
	return slices.ContainsFunc(caps.Drop, func(c string) bool { return capIs(c, "SETUID") })
}
