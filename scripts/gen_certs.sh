#!/usr/bin/env bash
# Generate the TLS material of a Flower deployment (and SuperNode auth keys).
#
#   scripts/gen_certs.sh OUTDIR [NUM_SUPERNODES] [EXTRA_SAN ...]
#
# Writes, in OUTDIR:
#   ca.crt, ca.key                  self-signed certificate authority (10 years)
#   server.pem, server.key          SuperLink certificate signed by the CA, with
#                                   subjectAltName DNS:localhost, IP:127.0.0.1, IP:::1
#                                   and every EXTRA_SAN (e.g. IP:10.0.0.5 DNS:link.lan)
#   supernode-<i>, supernode-<i>.pub   i = 0..NUM_SUPERNODES-1: ECDSA P-384 key pairs in
#                                   OpenSSH format, the format `flower-supernode
#                                   --auth-supernode-private-key` and `flwr supernode
#                                   register` read (SuperNode authentication)
#
# Idempotent: existing files are kept (delete OUTDIR to regenerate); no prompts.
# Only openssl and ssh-keygen are needed; nothing is downloaded.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

OUT="$1"
NODES="${2:-0}"
shift $(( $# >= 2 ? 2 : 1 ))
EXTRA_SANS=("$@")

if ! [[ "$NODES" =~ ^[0-9]+$ ]]; then
    echo "gen_certs.sh: NUM_SUPERNODES must be a non-negative integer, got '$NODES'" >&2
    exit 2
fi

mkdir -p "$OUT"
cd "$OUT"
umask 077   # private keys readable by the owner only

if [[ ! -s ca.key || ! -s ca.crt ]]; then
    openssl req -x509 -newkey rsa:2048 -sha256 -days 3650 -nodes \
        -keyout ca.key -out ca.crt -subj "/CN=hfedmoe-flower-ca" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    rm -f server.pem server.key   # a new CA invalidates the old server certificate
    echo "gen_certs: wrote $OUT/ca.crt"
fi

if [[ ! -s server.key || ! -s server.pem ]]; then
    san="DNS:localhost,IP:127.0.0.1,IP:::1"
    for extra in "${EXTRA_SANS[@]}"; do san="$san,$extra"; done
    ext="$(mktemp)"
    trap 'rm -f "$ext" server.csr' EXIT
    printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=$san" > "$ext"
    openssl req -new -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
        -subj "/CN=localhost" 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out server.pem -days 3650 -sha256 -extfile "$ext" 2>/dev/null
    rm -f server.csr
    echo "gen_certs: wrote $OUT/server.pem (subjectAltName $san)"
fi

for (( i = 0; i < NODES; i++ )); do
    if [[ ! -s "supernode-$i" || ! -s "supernode-$i.pub" ]]; then
        rm -f "supernode-$i" "supernode-$i.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "hfedmoe-supernode-$i" -f "supernode-$i"
        echo "gen_certs: wrote $OUT/supernode-$i{,.pub}"
    fi
done

chmod 644 ca.crt server.pem 2>/dev/null || true
for (( i = 0; i < NODES; i++ )); do chmod 644 "supernode-$i.pub"; done
