package inject

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// object is a JSON object that keeps its keys in order, so that an injected
// task definition differs from its input only where the sidecar went in.
type object []member

type member struct {
	key   string
	value json.RawMessage
}

// UnmarshalJSON reads one JSON object, keeping its keys' order.
func (o *object) UnmarshalJSON(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if tok != json.Delim('{') {
		return fmt.Errorf("expected a JSON object, found %v", tok)
	}
	*o = nil
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return err
		}
		*o = append(*o, member{key: tok.(string), value: value})
	}
	_, err = dec.Token()
	return err
}

// MarshalJSON writes the object with its keys in order.
func (o object) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, m := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		key, _ := json.Marshal(m.key)
		b.Write(key)
		b.WriteByte(':')
		b.Write(m.value)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (o object) get(key string) (json.RawMessage, bool) {
	for _, m := range o {
		if m.key == key {
			return m.value, true
		}
	}
	return nil, false
}

// str is the value of key if it is a string.
func (o object) str(key string) (string, bool) {
	raw, ok := o.get(key)
	var s string
	if !ok || json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

func (o object) decode(key string, v any) error {
	raw, ok := o.get(key)
	if !ok {
		return fmt.Errorf("task definition: %s is missing", key)
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("task definition: %s: %w", key, err)
	}
	return nil
}

// set replaces key's value in place, or appends key.
func (o *object) set(key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	for i := range *o {
		if (*o)[i].key == key {
			(*o)[i].value = raw
			return nil
		}
	}
	*o = append(*o, member{key: key, value: raw})
	return nil
}

func toObject(v any) (object, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var o object
	return o, json.Unmarshal(raw, &o)
}
