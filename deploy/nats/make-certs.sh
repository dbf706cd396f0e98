#!/bin/sh
# Make a private CA and one TLS certificate per NATS server, with openssl.
#
#   deploy/nats/make-certs.sh OUTDIR HOST [HOST ...]
#
# Writes OUTDIR/ca.pem and OUTDIR/ca-key.pem (the CA: made once, reused when present;
# keep ca-key.pem offline) and, per HOST, OUTDIR/HOST/server.pem and server-key.pem: an
# ECDSA P-256 key and a certificate for DNS:HOST, DNS:localhost and IP:127.0.0.1, valid
# for server and client use (cluster routes are mutual TLS), signed by the CA.  Copy
# OUTDIR/HOST/* and OUTDIR/ca.pem to that host's /etc/nats/tls/, and ca.pem to every
# node host's /etc/shipyard/tls/.
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: $0 OUTDIR HOST [HOST ...]" >&2
    exit 2
fi
out=$1
shift
days=${CERT_DAYS:-825}
mkdir -p "$out"
umask 077

if [ ! -f "$out/ca.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days 3650 -subj "/CN=shipyard NATS CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$out/ca-key.pem" -out "$out/ca.pem" 2>/dev/null
    chmod 644 "$out/ca.pem"
    echo "CA: $out/ca.pem (key $out/ca-key.pem)"
fi

for host in "$@"; do
    dir="$out/$host"
    mkdir -p "$dir"
    ext="$dir/ext.cnf"
    printf '%s\n' \
        "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth,clientAuth" \
        "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1" > "$ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=$host" -keyout "$dir/server-key.pem" -out "$dir/server.csr" 2>/dev/null
    openssl x509 -req -in "$dir/server.csr" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" \
        -CAcreateserial -days "$days" -extfile "$ext" -out "$dir/server.pem" 2>/dev/null
    rm -f "$dir/server.csr" "$ext"
    cp "$out/ca.pem" "$dir/ca.pem"
    chmod 644 "$dir/server.pem" "$dir/ca.pem"
    echo "$host: $dir/server.pem, $dir/server-key.pem, $dir/ca.pem"
done
