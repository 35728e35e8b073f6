package proxy_test

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/internal/testutil"
)

// isolateSDK leaves the AWS SDK nothing to find but the instance role: no
// credentials or config files, no environment credentials, no container or
// web-identity providers, and a fixed region so nothing else asks IMDS.
func isolateSDK(t *testing.T) {
	t.Helper()
	empty := filepath.Join(t.TempDir(), "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{
		"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
		"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
		"AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
		"AWS_EC2_METADATA_DISABLED", "AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
		"AWS_EC2_METADATA_V1_DISABLED",
	} {
		t.Setenv(name, "")
		os.Unsetenv(name)
	}
	t.Setenv("AWS_CONFIG_FILE", empty)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", empty)
	t.Setenv("AWS_REGION", "us-east-1")
}

// TestSDKThroughProxy runs the real AWS SDK for Go v2 against the proxy,
// whose upstream is amazon-ec2-metadata-mock requiring IMDSv2.
func TestSDKThroughProxy(t *testing.T) {
	for _, policy := range []imdsapi.V1Policy{imdsapi.V1Allow, imdsapi.V1Block} {
		t.Run("v1 "+string(policy), func(t *testing.T) {
			isolateSDK(t)
			aemm := testutil.StartAEMM(t, "-I")
			tap := testutil.NewTap(t, aemm.Addr)
			h := startProxy(t, tap.URL(), withV1(policy))
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()

			cfg, err := config.LoadDefaultConfig(ctx, config.WithEC2IMDSEndpoint(h.url))
			if err != nil {
				t.Fatal(err)
			}
			creds, err := cfg.Credentials.Retrieve(ctx)
			if err != nil {
				t.Fatalf("SDK could not get role credentials through the proxy: %v", err)
			}
			if creds.AccessKeyID != "12345678901" || creds.SecretAccessKey == "" || creds.SessionToken == "" {
				t.Errorf("credentials %q/%t/%t are not AEMM's role credentials", creds.AccessKeyID, creds.SecretAccessKey != "", creds.SessionToken != "")
			}
			client := imds.NewFromConfig(cfg, func(o *imds.Options) { o.Endpoint = h.url })
			out, err := client.GetMetadata(ctx, &imds.GetMetadataInput{Path: "instance-id"})
			if err != nil {
				t.Fatalf("GetMetadata through the proxy: %v", err)
			}
			id, _ := io.ReadAll(out.Content)
			if string(id) != "i-1234567890abcdef0" {
				t.Errorf("instance-id = %q", id)
			}

			assertUpstreamSawOnlySessionToken(t, tap)
			// Only the proxy's probe of the upstream's IMDSv1 policy may be tokenless: none under block.
			probes := 1
			if policy == imdsapi.V1Block {
				probes = 0
			}
			if n := testutil.CountLines(aemm.Logs(), "No token provided"); n != probes {
				t.Errorf("AEMM refused %d tokenless requests, want %d (the proxy's own probe)", n, probes)
			}
			if n := h.metric("imds_proxy_requests_total", map[string]string{"imds_version": "v1"}); n != 0 {
				t.Errorf("the SDK made %v IMDSv1 requests through the proxy, want 0", n)
			}
			h.assertNoSecretsLogged(creds.SecretAccessKey, creds.SessionToken)
		})
	}
}

// assertUpstreamSawOnlySessionToken: the proxy's own PUT is the only token
// request upstream, and every other request carries that one session token.
func assertUpstreamSawOnlySessionToken(t *testing.T, tap *testutil.Tap) {
	t.Helper()
	seen := tap.Requests()
	tokens := map[string]bool{}
	puts := 0
	for _, r := range seen {
		if r.Method == "PUT" {
			puts++
			if r.Header.Get("User-Agent") != "imds-proxy" {
				t.Errorf("a client's token PUT reached the upstream: %+v", r)
			}
			continue
		}
		tok := r.Header.Get(imdsapi.TokenHeader)
		if r.Header.Get("X-Imds-Proxy-Probe") != "" {
			continue // the proxy's own probe of the upstream's IMDSv1 policy
		}
		if tok == "" {
			t.Errorf("tokenless request upstream: %s %s", r.Method, r.Path)
		}
		tokens[tok] = true
	}
	if puts != 1 || len(tokens) != 1 || len(seen) < 3 {
		t.Errorf("upstream saw %d PUTs and %d distinct tokens in %d requests, want 1 PUT and 1 session token", puts, len(tokens), len(seen))
	}
}
