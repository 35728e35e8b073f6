package inject

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	corev1 "k8s.io/api/core/v1"
	sigsjson "sigs.k8s.io/json"
)

// asAPI decodes v's JSON strictly (known fields only, names case-sensitive)
// into the k8s.io/api type T: what the API server would make of it.
func asAPI[T any](t *testing.T, v any) T {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out T
	strictErrs, err := sigsjson.UnmarshalStrict(data, &out)
	if err != nil || len(strictErrs) > 0 {
		t.Fatalf("%s does not decode strictly into %T: %v %v", data, out, err, strictErrs)
	}
	return out
}

// TestLocalTypesAreTheAPIs: the sidecar's container and volume, declared
// locally to keep k8s.io/api out of the binary, decode strictly into the
// API's types, and the API's types encode them back to the very same JSON
// (same fields, same order).
func TestLocalTypesAreTheAPIs(t *testing.T) {
	workloadRole := DefaultOptions()
	workloadRole.Credentials = imdsapi.CredentialsWorkload
	workloadRole.source = credentialSource{env: []EnvVar{{Name: "AWS_ROLE_ARN", Value: "arn:aws:iam::111122223333:role/web"}},
		mounts: []VolumeMount{{Name: "aws-iam-token", ReadOnly: true, MountPath: "/var/run/secrets/eks.amazonaws.com/serviceaccount"}}}
	for name, v := range map[string]any{"container": Container(DefaultOptions()), "workload role container": Container(workloadRole), "volume": RunVolume()} {
		ours, _ := json.Marshal(v)
		var theirs []byte
		switch name {
		case "container", "workload role container":
			theirs, _ = json.Marshal(asAPI[corev1.Container](t, v))
		case "volume":
			theirs, _ = json.Marshal(asAPI[corev1.Volume](t, v))
		}
		if !bytes.Equal(ours, theirs) {
			t.Errorf("%s:\nours   %s\nk8s.io %s", name, ours, theirs)
		}
	}
}
