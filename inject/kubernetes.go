package inject

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	"go.yaml.in/yaml/v3"
	sigsjson "sigs.k8s.io/json"
)

// templatePaths says where each workload kind keeps its pod: the path to
// the mapping that holds the pod's metadata and spec.
var templatePaths = map[string][]string{
	"Pod":         {},
	"Deployment":  {"spec", "template"},
	"StatefulSet": {"spec", "template"},
	"DaemonSet":   {"spec", "template"},
	"ReplicaSet":  {"spec", "template"},
	"Job":         {"spec", "template"},
	"CronJob":     {"spec", "jobTemplate", "spec", "template"},
}

// Kubernetes adds the sidecar to every workload in a multi-document YAML
// stream, as the webhook would; the namespace of a workload is its
// metadata.namespace. Documents it does not change (other kinds, pods
// already injected or skipped) are copied byte for byte; changed ones keep
// their key order and comments. notes say which workloads were skipped or
// not injected, and why; a violation that o.Policy denies is an error.
func Kubernetes(in []byte, o Options) (out []byte, notes []string, err error) {
	if err := o.Validate(); err != nil {
		return nil, nil, err
	}
	o = o.withFloor()
	var b bytes.Buffer
	for i, chunk := range splitDocuments(in) {
		out, docNotes, err := injectDocument(chunk, o)
		if err != nil {
			return nil, nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		notes = append(notes, docNotes...)
		b.Write(out)
	}
	return b.Bytes(), notes, nil
}

// splitDocuments cuts a YAML stream before each "---" line, keeping every
// byte, so that unchanged documents can be written back exactly.
func splitDocuments(in []byte) [][]byte {
	var chunks [][]byte
	start := 0
	for i := 0; i < len(in); {
		end := bytes.IndexByte(in[i:], '\n')
		if end < 0 {
			end = len(in) - i - 1
		}
		if i > start && isSeparator(in[i:i+end+1]) {
			chunks = append(chunks, in[start:i])
			start = i
		}
		i += end + 1
	}
	return append(chunks, in[start:])
}

func isSeparator(line []byte) bool {
	rest, ok := bytes.CutPrefix(bytes.TrimRight(line, "\r\n"), []byte("---"))
	return ok && (len(rest) == 0 || rest[0] == ' ' || rest[0] == '\t')
}

// injectDocument returns chunk, or chunk with the sidecar added to the
// workload it holds, or to the workloads of a List.
func injectDocument(chunk []byte, o Options) ([]byte, []string, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(chunk, &doc); err != nil {
		return nil, nil, fmt.Errorf("not valid YAML: %w", err)
	}
	if len(doc.Content) == 0 || doc.Content[0].Kind != yaml.MappingNode {
		return chunk, nil, nil
	}
	objects := []*yaml.Node{doc.Content[0]}
	if items := lookup(doc.Content[0], "items"); scalar(doc.Content[0], "kind") == "List" && items != nil {
		objects = items.Content // kubectl get -o yaml
	}
	changed, notes := false, []string(nil)
	for _, obj := range objects {
		injected, objNotes, err := injectObject(obj, o)
		if err != nil {
			return nil, nil, err
		}
		changed = changed || injected
		notes = append(notes, objNotes...)
	}
	if !changed {
		return chunk, notes, nil
	}
	out, err := encodeDocument(chunk, &doc)
	return out, notes, err
}

// injectObject adds the sidecar to obj if it is a workload that should have
// it (or raises its own sidecar's --v1 to the floor), and says whether it
// changed obj; the notes explain skips, violations and warnings. A
// violation the policy denies is an error.
func injectObject(obj *yaml.Node, o Options) (bool, []string, error) {
	kind := scalar(obj, "kind")
	path, ok := templatePaths[kind]
	if !ok {
		return false, nil, nil
	}
	name := describe(kind, lookup(obj, "metadata"))
	template := lookup(obj, path...)
	specNode := lookup(template, "spec")
	if specNode == nil || specNode.Kind != yaml.MappingNode {
		return false, nil, fmt.Errorf("%s: no pod spec at %s", name, strings.Join(append(path, "spec"), "."))
	}
	var meta podMeta
	var spec podSpec
	if err := decodeNode(lookup(template, "metadata"), &meta); err != nil {
		return false, nil, fmt.Errorf("%s: pod metadata: %w", name, err)
	}
	if err := decodeNode(specNode, &spec); err != nil {
		return false, nil, fmt.Errorf("%s: pod spec: %w", name, err)
	}
	d := decide(meta, &spec, scalar(lookup(obj, "metadata"), "namespace"), o)
	var notes []string
	switch {
	case d.outcome == Denied:
		return false, nil, fmt.Errorf("%s: refused (--on-violation=deny): %s", name, d.reason)
	case d.reason != "" && d.outcome == Skipped:
		notes = append(notes, name+": skipped: "+d.reason)
	case d.reason != "":
		notes = append(notes, name+": not injected: "+d.reason)
	}
	for _, w := range d.warnings {
		notes = append(notes, name+": "+w)
	}
	switch {
	case d.inject != nil:
		return true, notes, addSidecar(specNode, *d.inject)
	case d.raise != nil:
		arg := lookup(lookup(specNode, "initContainers").Content[d.raise.container], "args").Content[d.raise.arg]
		arg.Value, arg.Style = d.raise.value, 0
		return true, notes, nil
	}
	return false, notes, nil
}

// addSidecar puts the sidecar first among the init containers, so that the
// redirect exists before any other container of the pod runs, and adds its
// /run volume. A field that is present but null ("initContainers:", as
// templates often render it) is replaced, never duplicated.
func addSidecar(spec *yaml.Node, o Options) error {
	container, err := toNode(Container(o))
	if err != nil {
		return err
	}
	volume, err := toNode(RunVolume())
	if err != nil {
		return err
	}
	switch init := lookup(spec, "initContainers"); {
	case init != nil && init.Kind == yaml.SequenceNode:
		init.Style = 0 // "[]" becomes a block list
		init.Content = append([]*yaml.Node{container}, init.Content...)
	case init != nil:
		*init = *sequence(container)
	default:
		insertBefore(spec, "containers", "initContainers", sequence(container))
	}
	switch volumes := lookup(spec, "volumes"); {
	case volumes != nil && volumes.Kind == yaml.SequenceNode:
		volumes.Style = 0
		volumes.Content = append(volumes.Content, volume)
	case volumes != nil:
		*volumes = *sequence(volume)
	default:
		spec.Content = append(spec.Content, keyNode("volumes"), sequence(volume))
	}
	return nil
}

// encodeDocument writes doc with two-space indentation, after the "---"
// line chunk started with, if any.
func encodeDocument(chunk []byte, doc *yaml.Node) ([]byte, error) {
	var b bytes.Buffer
	if line, _, _ := bytes.Cut(chunk, []byte("\n")); isSeparator(line) {
		b.WriteString("---\n")
	}
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(doc); err != nil {
		return nil, err
	}
	return b.Bytes(), enc.Close()
}

// toNode renders a Kubernetes API value as a block-style YAML node with the
// API's field order (the Go struct order of the types in k8s.go) and only
// the fields that are set.
func toNode(v any) (*yaml.Node, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		return nil, err
	}
	blockStyle(doc.Content[0])
	return doc.Content[0], nil
}

func blockStyle(n *yaml.Node) {
	n.Style = 0
	for _, c := range n.Content {
		blockStyle(c)
	}
}

// decodeNode decodes a YAML node into a Kubernetes API type by way of its
// JSON form, as the API server reads it: field names are case-sensitive,
// so "hostnetwork: true" means nothing here either. A missing node decodes
// to the zero value.
func decodeNode(n *yaml.Node, v any) error {
	if n == nil {
		return nil
	}
	var generic any
	if err := n.Decode(&generic); err != nil {
		return err
	}
	data, err := json.Marshal(generic)
	if err != nil {
		return err
	}
	return sigsjson.UnmarshalCaseSensitivePreserveInts(data, v)
}

// lookup follows keys through nested mappings; nil if any is missing.
func lookup(n *yaml.Node, keys ...string) *yaml.Node {
	for _, key := range keys {
		if n == nil || n.Kind != yaml.MappingNode {
			return nil
		}
		var next *yaml.Node
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == key {
				next = n.Content[i+1]
			}
		}
		n = next
	}
	return n
}

func scalar(n *yaml.Node, key string) string {
	if v := lookup(n, key); v != nil && v.Kind == yaml.ScalarNode {
		return v.Value
	}
	return ""
}

// describe names a workload for notes: "Deployment shop/web".
func describe(kind string, meta *yaml.Node) string {
	name := scalar(meta, "name")
	if name == "" {
		name = scalar(meta, "generateName") + "*"
	}
	if ns := scalar(meta, "namespace"); ns != "" {
		name = ns + "/" + name
	}
	return kind + " " + name
}

// insertBefore adds key: value to mapping m before the key named before,
// or at the end if there is none.
func insertBefore(m *yaml.Node, before, key string, value *yaml.Node) {
	at := len(m.Content)
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == before {
			at = i
		}
	}
	m.Content = append(m.Content[:at], append([]*yaml.Node{keyNode(key), value}, m.Content[at:]...)...)
}

func keyNode(key string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: key}
}

func sequence(items ...*yaml.Node) *yaml.Node {
	return &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Content: items}
}
