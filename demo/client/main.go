// Command client is the demo's workload: it uses the AWS SDK for Go v2 the way
// an application does, fetches the instance role's credentials and some
// metadata from the IMDS endpoint it is given, and prints how long each took.
//
// It reads only AWS_EC2_METADATA_SERVICE_ENDPOINT-style configuration given as
// a flag and contacts nothing but that endpoint.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

func main() {
	endpoint := flag.String("endpoint", "", "IMDS endpoint, e.g. http://127.0.0.1:8169; empty: the SDK's default, which AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6 switches to [fd00:ec2::254]")
	label := flag.String("label", "", "row label for the output table")
	calls := flag.Int("calls", 10, "metadata calls to time")
	asJSON := flag.Bool("json", false, "print one JSON object (for tests and benchmarks) instead of a table row")
	longLived := flag.Bool("long-lived", false, "keep one IMDS client and credential provider; for every line on stdin, "+
		"fetch instance-id and credentials (past any cache) with them and print one JSON line; exit at EOF")
	flag.Parse()
	if *longLived {
		if err := serveLines(*endpoint, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if *calls < 1 || *calls > 1000 {
		fmt.Fprintln(os.Stderr, "usage: client [--endpoint URL] [--label L] [--calls 1..1000] [--json]")
		os.Exit(2)
	}
	if err := run(*endpoint, *label, *calls, *asJSON); err != nil {
		fmt.Fprintf(os.Stdout, "%-34s FAILED: %v\n", *label, err)
		os.Exit(1)
	}
}

func run(endpoint, label string, calls int, asJSON bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	cfg, client, err := load(ctx, endpoint)
	if err != nil {
		return err
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		return fmt.Errorf("credentials: %w", err)
	}
	credTime := time.Since(start)

	start = time.Now()
	var id []byte
	for i := 0; i < calls; i++ {
		out, err := client.GetMetadata(ctx, &imds.GetMetadataInput{Path: "instance-id"})
		if err != nil {
			return fmt.Errorf("metadata: %w", err)
		}
		id, _ = io.ReadAll(out.Content)
	}
	perCall := time.Since(start) / time.Duration(calls)
	if asJSON {
		return json.NewEncoder(os.Stdout).Encode(map[string]any{
			"credentials_seconds": credTime.Seconds(), "per_call_seconds": perCall.Seconds(),
			"access_key_id": creds.AccessKeyID, "instance_id": string(id),
		})
	}
	fmt.Printf("%-34s %12s %14s   key %s…, instance %s\n", label, round(credTime), round(perCall), creds.AccessKeyID[:4], id)
	return nil
}

// load is the SDK's configuration as an application loads it, and an IMDS
// client on it, both for endpoint ("": the SDK's default).
func load(ctx context.Context, endpoint string) (aws.Config, *imds.Client, error) {
	opts := []func(*config.LoadOptions) error{config.WithRegion("us-east-1")}
	if endpoint != "" {
		opts = append(opts, config.WithEC2IMDSEndpoint(endpoint))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return aws.Config{}, nil, err
	}
	client := imds.NewFromConfig(cfg, func(o *imds.Options) {
		if endpoint != "" {
			o.Endpoint = endpoint
		}
	})
	return cfg, client, nil
}

// roundResult is one line of the long-lived mode's output.
type roundResult struct {
	OK          bool   `json:"ok"`
	Error       string `json:"error"`
	AccessKeyID string `json:"access_key_id"`
	InstanceID  string `json:"instance_id"`
}

// serveLines is a long-running application: one IMDS client (so one token
// and one keep-alive connection pool) and one credential provider on it,
// used for every line read from in. Each round GETs instance-id and
// retrieves the role's credentials straight from the provider, past the
// cache an application's aws.Config would put in front of it.
func serveLines(endpoint string, in io.Reader, out io.Writer) error {
	ctx := context.Background()
	_, client, err := load(ctx, endpoint)
	if err != nil {
		return err
	}
	provider := ec2rolecreds.New(func(o *ec2rolecreds.Options) { o.Client = client })
	enc := json.NewEncoder(out)
	lines := bufio.NewScanner(in)
	for lines.Scan() {
		if err := enc.Encode(round1(ctx, client, provider)); err != nil {
			return err
		}
	}
	return lines.Err()
}

func round1(ctx context.Context, client *imds.Client, provider *ec2rolecreds.Provider) roundResult {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var r roundResult
	md, err := client.GetMetadata(ctx, &imds.GetMetadataInput{Path: "instance-id"})
	if err != nil {
		r.Error = fmt.Sprintf("metadata: %v", err)
		return r
	}
	id, err := io.ReadAll(md.Content)
	md.Content.Close()
	if err != nil {
		r.Error = fmt.Sprintf("metadata: %v", err)
		return r
	}
	r.InstanceID = string(id)
	creds, err := provider.Retrieve(ctx)
	if err != nil {
		r.Error = fmt.Sprintf("credentials: %v", err)
		return r
	}
	r.AccessKeyID, r.OK = creds.AccessKeyID, true
	return r
}

func round(d time.Duration) string {
	return d.Round(10 * time.Microsecond).String()
}
