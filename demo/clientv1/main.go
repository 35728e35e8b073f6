// Command clientv1 is a workload on the AWS SDK for Go v1 (aws-sdk-go),
// which many long-lived applications still use: it fetches the instance
// role's credentials and the instance ID from IMDS the way the SDK does, so
// the tests run a second, older IMDS client implementation against the
// proxy. It contacts only the IMDS endpoint (the SDK's default, or
// --endpoint).
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go/aws/ec2metadata"
	"github.com/aws/aws-sdk-go/aws/session"
)

// result is one round: the same JSON the Go SDK v2 demo client prints.
type result struct {
	OK          bool    `json:"ok"`
	Error       string  `json:"error,omitempty"`
	AccessKeyID string  `json:"access_key_id,omitempty"`
	InstanceID  string  `json:"instance_id,omitempty"`
	Credentials float64 `json:"credentials_seconds,omitempty"`
}

func main() {
	endpoint := flag.String("endpoint", "", "IMDS endpoint (http://host[:port]); empty: the SDK's default")
	longLived := flag.Bool("long-lived", false, "keep one session and IMDS client; for every line on stdin, fetch "+
		"instance-id and credentials (past any cache) and print one JSON line; exit at EOF")
	flag.Parse()
	cfg := aws.NewConfig().WithRegion("us-east-1").WithMaxRetries(3)
	if *endpoint != "" {
		cfg = cfg.WithEndpoint(*endpoint)
	}
	sess, err := session.NewSession()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	client := ec2metadata.New(sess, cfg)
	if !*longLived {
		r := round(client)
		_ = json.NewEncoder(os.Stdout).Encode(r)
		if !r.OK {
			os.Exit(1)
		}
		return
	}
	if err := serveLines(client, os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func serveLines(client *ec2metadata.EC2Metadata, in io.Reader, out io.Writer) error {
	enc := json.NewEncoder(out)
	lines := bufio.NewScanner(in)
	for lines.Scan() {
		if err := enc.Encode(round(client)); err != nil {
			return err
		}
	}
	return lines.Err()
}

// round reads the instance ID, then credentials from a provider built on
// the same client (so its token and connections are reused) with nothing
// cached.
func round(client *ec2metadata.EC2Metadata) result {
	var r result
	id, err := client.GetMetadata("instance-id")
	if err != nil {
		r.Error = fmt.Sprintf("metadata: %v", err)
		return r
	}
	r.InstanceID = id
	start := time.Now()
	creds, err := (&ec2rolecreds.EC2RoleProvider{Client: client}).Retrieve()
	if err != nil {
		r.Error = fmt.Sprintf("credentials: %v", err)
		return r
	}
	r.Credentials = time.Since(start).Seconds()
	r.AccessKeyID, r.OK = creds.AccessKeyID, true
	return r
}
