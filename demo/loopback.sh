#!/usr/bin/env bash
# The loopback demo: amazon-ec2-metadata-mock (IMDSv2 required) on 127.0.0.1,
# imds-proxy in front of it, and the AWS SDK for Go v2 fetching role
# credentials directly and through the proxy. Everything listens on loopback
# and is stopped on exit. The network-namespace demo with a real hop limit
# replaces this once it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

AEMM_PORT=${AEMM_PORT:-18338}
PROXY_PORT=${PROXY_PORT:-18169}
METRICS_PORT=${METRICS_PORT:-19169}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# AEMM reads config files from $HOME and its working directory: give it an empty one.
(cd "$work" && HOME="$work" exec "$root/bin/ec2-metadata-mock" -I -n 127.0.0.1 -p "$AEMM_PORT" >"$work/aemm.log" 2>&1) &
pids+=($!)
wait_port "$AEMM_PORT"

"$root/bin/imds-proxy" sidecar --rules=false --listen "127.0.0.1:$PROXY_PORT" \
  --metrics-listen "127.0.0.1:$METRICS_PORT" --upstream "http://127.0.0.1:$AEMM_PORT" \
  --log-format console --log-level info 2>"$work/proxy.log" &
pids+=($!)
wait_port "$PROXY_PORT"

# The SDK must find nothing but the instance role.
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_REGION=us-east-1
unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_PROFILE \
  AWS_CONTAINER_CREDENTIALS_RELATIVE_URI AWS_CONTAINER_CREDENTIALS_FULL_URI AWS_WEB_IDENTITY_TOKEN_FILE

echo
echo "AWS SDK for Go v2 -> IMDS mock (amazon-ec2-metadata-mock, IMDSv2 required), on loopback"
printf '%-34s %12s %14s\n' "path" "credentials" "per call"
"$root/bin/demo-client" --label "direct to the IMDS mock" --endpoint "http://127.0.0.1:$AEMM_PORT"
"$root/bin/demo-client" --label "through imds-proxy (sidecar)" --endpoint "http://127.0.0.1:$PROXY_PORT"

echo
echo "A tokenless (IMDSv1) call through the proxy is served over the proxy's own IMDSv2 session:"
curl -s -o /dev/null -w "  curl /latest/meta-data/instance-id without a token -> HTTP %{http_code}\n" \
  --noproxy '*' "http://127.0.0.1:$PROXY_PORT/latest/meta-data/instance-id"
echo "  and is logged:"
grep 'IMDSv1 request' "$work/proxy.log" | sed 's/^/    /'

echo
echo "Proxy metrics (http://127.0.0.1:$METRICS_PORT/metrics):"
curl -s --noproxy '*' "http://127.0.0.1:$METRICS_PORT/metrics" |
  grep -E '^imds_proxy_(requests_total|tokens_minted_total|upstream_session_state)' | sed 's/^/  /'
echo
echo "Tokenless requests AEMM refused: $(grep -c 'No token provided' "$work/aemm.log" || true)"
