#!/usr/bin/env bash
# Development-only CA for testhide, made with openssl: a P-256 CA whose
# organisation marks it as development material. The control plane refuses it
# unless started with --dev, so it can never slip into production unnoticed.
#
#   certs-dev/generate.sh                      # writes certs-dev/out/dev-ca.{pem,key}
#   testhide-controlplane init --data-dir DIR --import-ca certs-dev/out/dev-ca.pem certs-dev/out/dev-ca.key --dev
#   testhide-controlplane serve --data-dir DIR --dev
set -euo pipefail
out="$(cd "$(dirname "$0")" && pwd)/out"
mkdir -p "$out"
umask 077
openssl ecparam -name prime256v1 -genkey -noout -out "$out/dev-ca.key.sec1"
openssl pkcs8 -topk8 -nocrypt -in "$out/dev-ca.key.sec1" -out "$out/dev-ca.key"
rm -f "$out/dev-ca.key.sec1"
openssl req -x509 -new -key "$out/dev-ca.key" -sha256 -days 365 -out "$out/dev-ca.pem" \
  -subj "/O=testhide development (insecure)/CN=testhide development CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"
chmod 644 "$out/dev-ca.pem"
echo "wrote $out/dev-ca.pem and $out/dev-ca.key (development only)"
