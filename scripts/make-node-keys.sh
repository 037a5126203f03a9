#!/usr/bin/env bash
# SuperNode authentication key pairs: ECDSA on NIST P-384, in OpenSSH format,
# which is what `flower-supernode --auth-supernode-private-key` and
# `flwr supernode register` read in Flower 1.42.
#
#   scripts/make-node-keys.sh [-o DIR] NAME...
#
#   DIR/NAME       private key: stays on the SuperNode's host
#   DIR/NAME.pub   public key: the operator registers it with the SuperLink
#                  (`flwr supernode register DIR/NAME.pub <connection>`)
# Existing keys are kept. DIR defaults to "keys".
set -euo pipefail

dir=keys
while getopts "o:h" opt; do
  case "$opt" in
    o) dir="$OPTARG" ;;
    *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-o DIR] NAME..." >&2; exit 2; }
command -v ssh-keygen >/dev/null || { echo "ssh-keygen (openssh-client) is required" >&2; exit 1; }

mkdir -p "$dir"
for n in "$@"; do
  if [ -f "$dir/$n" ]; then echo "kept $dir/$n"; continue; fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$n" -f "$dir/$n"
  echo "created $dir/$n and $dir/$n.pub"
done
