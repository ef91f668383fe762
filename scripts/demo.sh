#!/usr/bin/env bash
# Install kvpki into .venv and run the main job on the embedded local store:
# create a root and an issuing CA, make a device key + CSR with openssl, sign it
# with `kvpki sign-csr`, and verify the result with `openssl verify`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet .
export PATH="$PWD/.venv/bin:$PATH"

demo=$(mktemp -d "${TMPDIR:-/tmp}/kvpki-demo.XXXXXX")
export KVPKI_HOME="$demo/home"
kvpki init-ca --name demo-root --subject "CN=kvpki Demo Root CA,O=kvpki demo" --key-type ec-p384 > "$demo/root.pem"
kvpki init-ca --name demo-issuing --parent demo-root --subject "CN=kvpki Demo Issuing CA,O=kvpki demo" > "$demo/issuing.pem"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$demo/device-001.key" -subj "/CN=device-001" -out "$demo/device-001.csr" 2>/dev/null
kvpki sign-csr --ca demo-issuing --profile device < "$demo/device-001.csr" > "$demo/device-001.pem"
openssl verify -CAfile "$demo/root.pem" -untrusted "$demo/issuing.pem" "$demo/device-001.pem"
openssl x509 -in "$demo/device-001.pem" -noout -subject -issuer -enddate
kvpki list --ca demo-issuing
echo "demo files are in $demo"
