package workloadrole

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imds-proxy/imds-proxy/workload"
)

// TestFromEnvironment: the source the environment names is asked, with Pod
// Identity's token read from its file, also where AWS_CA_BUNDLE names a CA
// (which the SDK adds to its own HTTP client only); the credentials keep
// the source's Expiration; and an environment that names no workload role,
// or has static keys that the SDK would pick first, is refused. The source
// here is an httptest server on loopback, which the SDK allows for
// AWS_CONTAINER_CREDENTIALS_FULL_URI (and which HTTP_PROXY never applies
// to: the e2e tests set HTTP_PROXY for the sources at 169.254.170.x).
func TestFromEnvironment(t *testing.T) {
	expires := time.Now().Add(6 * time.Hour).UTC().Truncate(time.Second)
	agent := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "pod-identity-jwt" {
			http.Error(w, "no token", http.StatusUnauthorized)
			return
		}
		_, _ = w.Write([]byte(`{"AccessKeyId":"ASIAPODIDENTITY","SecretAccessKey":"s","Token":"t","AccountId":"111122223333","Expiration":"` +
			expires.Format(time.RFC3339) + `"}`))
	}))
	defer agent.Close()
	tokenFile := filepath.Join(t.TempDir(), "eks-pod-identity-token")
	if err := os.WriteFile(tokenFile, []byte("pod-identity-jwt"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
		"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"} {
		t.Setenv(v, "")
	}
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	ctx := context.Background()

	if _, err := FromEnvironment(ctx, ""); err == nil || !strings.Contains(err.Error(), "names no workload role") {
		t.Errorf("no source: %v", err)
	}

	t.Setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", agent.URL+"/v1/credentials")
	t.Setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", tokenFile)
	role, err := FromEnvironment(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	c, err := role.Credentials(ctx, false)
	if err != nil || c.AccessKeyID != "ASIAPODIDENTITY" || !c.Expiration.Equal(expires) {
		t.Errorf("Pod Identity: %+v, %v; want ASIAPODIDENTITY expiring at %s, the source's", c, err, expires)
	}
	if name, arn, source := role.Role(); name != workload.IdentityPodIdentity || arn != "" || source != workload.IdentityPodIdentity {
		t.Errorf("role %q %q %q, want the source's name, no ARN", name, arn, source)
	}

	// An endpoint that redirects (to IMDS, say) is not followed.
	imds := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"AccessKeyId":"ASIAINSTANCEROLE","SecretAccessKey":"s","Token":"t","Expiration":"` + expires.Format(time.RFC3339) + `"}`))
	}))
	defer imds.Close()
	redirecting := httptest.NewServer(http.RedirectHandler(imds.URL+"/latest/meta-data/iam/security-credentials/node", http.StatusTemporaryRedirect))
	defer redirecting.Close()
	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", redirecting.URL+"/v1/credentials")
	if role, err := FromEnvironment(ctx, ""); err != nil {
		t.Fatal(err)
	} else if c, err := role.Credentials(ctx, false); err == nil || c.AccessKeyID == "ASIAINSTANCEROLE" {
		t.Errorf("a redirecting endpoint: %+v, %v; want an error, never what it redirects to", c, err)
	}

	t.Setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "x")
	if _, err := FromEnvironment(ctx, ""); err == nil || !strings.Contains(err.Error(), "resolves other credentials first") {
		t.Errorf("static keys beside the source: %v, want them refused", err)
	}
}
