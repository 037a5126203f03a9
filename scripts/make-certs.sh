#!/usr/bin/env bash
# TLS material for a deployment: a private CA and one server certificate whose
# subject alternative names (SANs) are the host names / IP addresses given.
#
#   scripts/make-certs.sh [-o DIR] [-n NAME] [-d DAYS] HOST_OR_IP...
#
#   DIR/ca.crt, DIR/ca.key        the CA (created once; reused if DIR already has one)
#   DIR/NAME.crt, DIR/NAME.key    a server certificate signed by the CA (NAME: "server")
#
# Give every name and address clients use to reach the server: e.g. the
# SuperLink's public DNS name and IP, and its Docker service name "superlink".
# A SuperNode's own Runtime API (for its SuperExec) needs a certificate too:
#   scripts/make-certs.sh -o certs -n supernode-1 supernode-1 10.0.0.11
# Distribute only ca.crt; keep ca.key offline and each NAME.key on its host.
set -euo pipefail

dir=certs name=server days=365
while getopts "o:n:d:h" opt; do
  case "$opt" in
    o) dir="$OPTARG" ;;
    n) name="$OPTARG" ;;
    d) days="$OPTARG" ;;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-o DIR] [-n NAME] [-d DAYS] HOST_OR_IP..." >&2; exit 2; }
command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 1; }

sans=()
for h in "$@"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then sans+=("IP:$h"); else sans+=("DNS:$h"); fi
done
san_list=$(IFS=,; echo "${sans[*]}")

mkdir -p "$dir"
umask 077  # keys readable by the owner only
if [ ! -f "$dir/ca.crt" ] || [ ! -f "$dir/ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -nodes -days "$days" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/CN=fedlora deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "created CA $dir/ca.crt"
fi

openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -nodes -keyout "$dir/$name.key" -out "$dir/$name.csr" \
  -subj "/CN=$1" 2>/dev/null
ext=$(mktemp)
trap 'rm -f "$ext" "$dir/$name.csr"' EXIT
printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
  "extendedKeyUsage=serverAuth" "subjectAltName=$san_list" >"$ext"
openssl x509 -req -sha256 -days "$days" -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
  -CAcreateserial -extfile "$ext" -out "$dir/$name.crt" 2>/dev/null
chmod 644 "$dir/ca.crt" "$dir/$name.crt"
echo "created $dir/$name.crt ($san_list)"
