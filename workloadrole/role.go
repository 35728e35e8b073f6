// Package workloadrole is the workload's own AWS role, which a sidecar
// serves on the IMDS role path in place of the instance's
// (--credentials=workload): the ECS task role, the EKS Pod Identity role or
// the IRSA role, from the source the platform gives every container of the
// task or pod, through the AWS SDK for Go v2's own credential resolution.
// It never falls back to the instance's role. Only the
// imds-proxy-workload-role build links it (build tag workloadrole): the
// SDK costs every process about 2.6 MB of binary and 2.7 MiB of RSS.
package workloadrole

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/endpointcreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"

	"github.com/imds-proxy/imds-proxy/imdsapi"
	"github.com/imds-proxy/imds-proxy/workload"
)

// Role is the workload's role and its credentials, cached until they
// expire or are renewed; concurrent retrievals share one.
type Role struct {
	// Name is the role's name, the one entry IMDS lists under
	// iam/security-credentials/: the last part of ARN, else Source.
	Name string
	// ARN is the role's ARN where it is known (IRSA's AWS_ROLE_ARN, or
	// --workload-role-arn), else empty.
	ARN string
	// Source is where its credentials come from: workload.IdentityIRSA,
	// IdentityTaskRole or IdentityPodIdentity.
	Source string

	// creds caches the source's credentials to their real expiry (its
	// ExpiryWindow is 0, so that the Expiration served is the source's).
	creds *aws.CredentialsCache

	mu        sync.Mutex
	accessKey string    // of the credentials last retrieved
	updated   time.Time // when they were first seen
}

// New is the role named by arn (or by source, if arn is empty) whose
// credentials provider gives. It caches them, unless provider is a cache
// already (whose ExpiryWindow must then be 0).
func New(arn, source string, provider aws.CredentialsProvider) *Role {
	cache, cached := provider.(*aws.CredentialsCache)
	if !cached {
		cache = aws.NewCredentialsCache(provider, cacheOptions)
	}
	name := source
	if i := strings.LastIndex(arn, "/"); i >= 0 && i < len(arn)-1 {
		name = arn[i+1:]
	}
	return &Role{Name: name, ARN: arn, Source: source, creds: cache}
}

// cacheOptions keep credentials to their real expiry: a cache with an
// ExpiryWindow hands them out with their Expiration moved that much earlier.
func cacheOptions(o *aws.CredentialsCacheOptions) {
	o.ExpiryWindow, o.ExpiryWindowJitterFrac = 0, 0
}

// FromEnvironment is the role of the source that the process's environment
// names, found by the AWS SDK's own resolution with the instance metadata
// (the instance's role) switched off. arn names the role where the source
// does not (the ECS task role and Pod Identity); it may be empty.
func FromEnvironment(ctx context.Context, arn string) (*Role, error) {
	source, want, err := sourceHere()
	if err != nil {
		return nil, err
	}
	if source == workload.IdentityIRSA {
		arn = os.Getenv("AWS_ROLE_ARN")
	}
	// Only ever the platform's source: no HTTP_PROXY between, for STS and
	// for the container endpoints alike (which the SDK would otherwise ask
	// with a client of their own).
	// The SDK's own client, which AWS_CA_BUNDLE can add a CA to.
	client := awshttp.NewBuildableClient().WithTransportOptions(func(t *http.Transport) {
		t.Proxy, t.ResponseHeaderTimeout = nil, 5*time.Second
	})
	// The container endpoints' answers are not followed anywhere: a
	// redirect to IMDS would fetch the instance's role, past the redirect
	// rules, which exempt the sidecar's own traffic.
	endpointClient := &http.Client{
		Transport:     &http.Transport{Proxy: nil, ResponseHeaderTimeout: 5 * time.Second},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	cfg, err := config.LoadDefaultConfig(ctx,
		config.WithEC2IMDSClientEnableState(imds.ClientDisabled), // never the instance's role
		config.WithSharedConfigFiles([]string{}),
		config.WithSharedCredentialsFiles([]string{}),
		config.WithHTTPClient(client),
		config.WithEndpointCredentialOptions(func(o *endpointcreds.Options) { o.HTTPClient = endpointClient }),
		config.WithCredentialsCacheOptions(cacheOptions),
	)
	if err != nil {
		return nil, fmt.Errorf("the %s credentials: %w", source, err)
	}
	cache, ok := cfg.Credentials.(*aws.CredentialsCache)
	if !ok || !slices.Contains(cache.ProviderSources(), want) || slices.Contains(cache.ProviderSources(), aws.CredentialSourceIMDS) {
		// Static keys in the environment, or a profile, win over every
		// platform source in the SDK's order: they are not the workload's role.
		return nil, fmt.Errorf("the environment names the %s source, but the AWS SDK resolves other credentials first "+
			"(AWS_ACCESS_KEY_ID, AWS_PROFILE or a shared config file): remove them from the sidecar", source)
	}
	if source == workload.IdentityIRSA && cfg.Region == "" {
		return nil, errors.New("IRSA needs AWS_REGION for the regional STS endpoint: set it on the sidecar " +
			"(the EKS webhook sets it on every container it mutates)")
	}
	return New(arn, source, cache), nil
}

// sourceHere names the source the environment sets, in the AWS SDK's own
// order, and the provider source the SDK reports for it. The sources are
// the workload's own identities (workload.Workload's OwnIdentity):
//   - workload.IdentityIRSA: AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE,
//     exchanged at the regional STS with AssumeRoleWithWebIdentity;
//   - workload.IdentityTaskRole: the ECS agent's endpoint at 169.254.170.2
//     and AWS_CONTAINER_CREDENTIALS_RELATIVE_URI;
//   - workload.IdentityPodIdentity: AWS_CONTAINER_CREDENTIALS_FULL_URI (the
//     agent at 169.254.170.23) with AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE.
func sourceHere() (string, aws.CredentialSource, error) {
	switch {
	case os.Getenv("AWS_WEB_IDENTITY_TOKEN_FILE") != "":
		if os.Getenv("AWS_ROLE_ARN") == "" {
			return "", 0, errors.New("AWS_WEB_IDENTITY_TOKEN_FILE is set without AWS_ROLE_ARN: IRSA needs both")
		}
		return workload.IdentityIRSA, aws.CredentialSourceEnvVarsSTSWebIDToken, nil
	case os.Getenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") != "":
		return workload.IdentityTaskRole, aws.CredentialSourceHTTP, nil
	case os.Getenv("AWS_CONTAINER_CREDENTIALS_FULL_URI") != "":
		return workload.IdentityPodIdentity, aws.CredentialSourceHTTP, nil
	}
	return "", 0, errors.New("the environment names no workload role: want AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (an ECS task role), " +
		"AWS_CONTAINER_CREDENTIALS_FULL_URI (EKS Pod Identity) or AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE (IRSA) on the sidecar")
}

// Role names the role: its name, its ARN where known, and its source (it
// is a proxy.RoleSource).
func (r *Role) Role() (name, arn, source string) { return r.Name, r.ARN, r.Source }

// Credentials are the role's credentials: the cached ones, or with renew,
// or when none are cached or they expired, new ones from the source (the
// proxy decides when to renew: proxy.RoleSource).
func (r *Role) Credentials(ctx context.Context, renew bool) (imdsapi.RoleCredentials, error) {
	if renew {
		r.creds.Invalidate()
	}
	c, err := r.creds.Retrieve(ctx)
	if err != nil {
		return imdsapi.RoleCredentials{}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if c.AccessKeyID != r.accessKey {
		r.accessKey, r.updated = c.AccessKeyID, time.Now().UTC()
	}
	return imdsapi.RoleCredentials{AccessKeyID: c.AccessKeyID, SecretAccessKey: c.SecretAccessKey, Token: c.SessionToken,
		Expiration: c.Expires, LastUpdated: r.updated}, nil
}
