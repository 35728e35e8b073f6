#!/usr/bin/env bash
# gen-certs.sh OUT_DIR: the admission webhook's TLS files, for clusters
# without cert-manager (with cert-manager use ../webhook-with-cert-manager).
#
# Writes, with openssl:
#   OUT_DIR/ca.crt   a CA made for this webhook alone (EC P-256, 365 days);
#                    its key is thrown away once it has signed the leaf
#   OUT_DIR/tls.crt  the serving certificate, signed by that CA, for
#                    imds-proxy-webhook.imds-proxy.svc and
#                    imds-proxy-webhook.imds-proxy.svc.cluster.local,
#                    extendedKeyUsage serverAuth, 365 days
#   OUT_DIR/tls.key  its private key (EC P-256, PKCS#8, mode 0600)
# and prints the two kubectl commands that install them: the Secret the
# webhook mounts, and the caBundle of both webhooks of the
# MutatingWebhookConfiguration. It runs nothing against a cluster itself.
#
# Run it again before the 365 days are up, then the printed commands (both
# are safe to repeat); the webhook re-reads its files without a restart.
set -euo pipefail

if [[ $# -ne 1 || -z $1 ]]; then
	echo "usage: $0 OUT_DIR" >&2
	exit 2
fi
command -v openssl >/dev/null || { echo "$0: openssl is not installed" >&2; exit 1; }

namespace=imds-proxy
service=imds-proxy-webhook
secret=imds-proxy-webhook-tls
webhook_config=imds-proxy
days=365

mkdir -p -- "$1"
out=$(cd -- "$1" && pwd)
umask 077
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

# A configuration of its own, so the system openssl.cnf adds nothing.
cat >"$work/openssl.cnf" <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:$service.$namespace.svc, DNS:$service.$namespace.svc.cluster.local
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF

serial() { echo "0x$(openssl rand -hex 16)"; }
# quiet runs openssl, showing what it said only if it failed.
quiet() {
	local said
	said=$(openssl "$@" 2>&1) || { printf '%s\n' "$said" >&2; return 1; }
}

quiet genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ca.key"
quiet req -x509 -new -config "$work/openssl.cnf" -extensions ca \
	-key "$work/ca.key" -subj "/CN=$service.$namespace webhook CA" \
	-set_serial "$(serial)" -days "$days" -sha256 -out "$work/ca.crt"

quiet genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/tls.key"
quiet req -new -config "$work/openssl.cnf" \
	-key "$work/tls.key" -subj "/CN=$service.$namespace.svc" -out "$work/tls.csr"
quiet x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
	-set_serial "$(serial)" -days "$days" -sha256 \
	-extfile "$work/openssl.cnf" -extensions leaf -out "$work/tls.crt"
quiet verify -CAfile "$work/ca.crt" -purpose sslserver "$work/tls.crt"

for f in ca.crt tls.crt tls.key; do
	mv -f -- "$work/$f" "$out/$f"
done
chmod 0644 "$out/ca.crt" "$out/tls.crt"
chmod 0600 "$out/tls.key"

ca_bundle=$(openssl base64 -A -in "$out/ca.crt")
patch=$(printf '[{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"%s"},{"op":"add","path":"/webhooks/1/clientConfig/caBundle","value":"%s"}]' "$ca_bundle" "$ca_bundle")

cat <<MSG
Wrote $out/ca.crt, $out/tls.crt and $out/tls.key (valid $days days).
After \`kubectl apply -k deploy/kubernetes/webhook\`, run:

kubectl -n $namespace create secret tls $secret --cert=$(printf %q "$out/tls.crt") --key=$(printf %q "$out/tls.key") --dry-run=client -o yaml | kubectl apply -f -

kubectl patch mutatingwebhookconfiguration $webhook_config --type=json -p '$patch'
MSG
