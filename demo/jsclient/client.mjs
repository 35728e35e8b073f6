// The AWS SDK for JavaScript v3 as a workload: credentials through
// @smithy/credential-provider-imds (what the SDK's default chain uses on
// EC2) and the instance ID through @aws-sdk/ec2-metadata-service. It
// prints the same JSON as the Go demo clients: once, or with --long-lived
// once per line on stdin, keeping one provider and one metadata client.
// It contacts only the SDK's default IMDS endpoint (169.254.169.254, or
// what AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE selects).
import { createInterface } from "node:readline";
import { fromInstanceMetadata } from "@smithy/credential-provider-imds";
import { MetadataService } from "@aws-sdk/ec2-metadata-service";

const metadata = new MetadataService({ httpOptions: { timeout: 5000 } });
const credentials = fromInstanceMetadata({ timeout: 5000, maxRetries: 3 });

async function round() {
  const r = { ok: false };
  try {
    r.instance_id = (await metadata.request("/latest/meta-data/instance-id", {})).trim();
  } catch (e) {
    r.error = `metadata: ${e.message}`;
    return r;
  }
  try {
    const start = process.hrtime.bigint();
    const c = await credentials();
    r.credentials_seconds = Number(process.hrtime.bigint() - start) / 1e9;
    r.access_key_id = c.accessKeyId;
    r.ok = true;
  } catch (e) {
    r.error = `credentials: ${e.message}`;
  }
  return r;
}

if (process.argv.includes("--long-lived")) {
  for await (const _ of createInterface({ input: process.stdin })) {
    process.stdout.write(JSON.stringify(await round()) + "\n");
  }
} else {
  const r = await round();
  process.stdout.write(JSON.stringify(r) + "\n");
  process.exitCode = r.ok ? 0 : 1;
}
