#!/usr/bin/env bash
# Prepare docker/ for a secure deployment: TLS certificates, SuperNode keys,
# SuperExec secrets and data folders, at the paths the compose files mount.
#
#   scripts/deploy-docker-setup.sh single N [HOST...]   one host, N SuperNodes (docker/compose.yml)
#   scripts/deploy-docker-setup.sh server HOST...       server host (docker/server.compose.yml);
#                                                       HOST: every DNS name / IP clients and the
#                                                       operator use for it
#   scripts/deploy-docker-setup.sh client               one client host (docker/client.compose.yml)
#
# DIR (default docker/, or $FEDLORA_DOCKER_DIR) gets certs/, keys/, secrets/, data/.
# Existing keys and the CA are kept, so it is safe to rerun (e.g. to add a node:
# `single 4` creates what supernode-4 needs). The containers run as uid 49999
# (user app of the Flower images): as root this script hands them the files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${FEDLORA_DOCKER_DIR:-$here/../docker}"
mode="${1:-}"; shift || true

secret() { [ -f "$1" ] || { mkdir -p "$(dirname "$1")"; (umask 077; openssl rand 32 >"$1"); echo "created $1"; }; }

case "$mode" in
  single)
    n="${1:?usage: $0 single N [HOST...]}"; shift
    # superlink: the SuperLink and the proxies present it; superlink-fleet: what the SuperNodes dial.
    "$here/make-certs.sh" -o "$dir/certs" -n superlink superlink superlink-fleet localhost 127.0.0.1 "$@"
    secret "$dir/secrets/superlink.secret"
    mkdir -p "$dir/data/server"
    for i in $(seq 1 "$n"); do
      "$here/make-certs.sh" -o "$dir/certs" -n "supernode-$i" "supernode-$i"
      "$here/make-node-keys.sh" -o "$dir/keys" "supernode-$i"
      secret "$dir/secrets/supernode-$i.secret"
      mkdir -p "$dir/data/supernode-$i"
    done
    ;;
  server)
    [ $# -gt 0 ] || { echo "usage: $0 server HOST..." >&2; exit 2; }
    # localhost/127.0.0.1: the operator's flwr CLI on this host or through an SSH tunnel
    # (the Control API listens on 127.0.0.1:9093 unless CONTROL_API_BIND says otherwise).
    "$here/make-certs.sh" -o "$dir/certs" -n superlink superlink superlink-fleet localhost 127.0.0.1 "$@"
    secret "$dir/secrets/superlink.secret"
    mkdir -p "$dir/data/server"
    ;;
  client)
    # A CA of this host's own, for its SuperNode's Runtime API (used only inside this host).
    "$here/make-certs.sh" -o "$dir/certs" -n supernode supernode
    "$here/make-node-keys.sh" -o "$dir/keys" supernode
    secret "$dir/secrets/supernode.secret"
    mkdir -p "$dir/data/node"
    [ -f "$dir/certs/superlink-ca.crt" ] || echo "next: copy the federation's CA certificate to $dir/certs/superlink-ca.crt"
    echo "next: send $dir/keys/supernode.pub to the operator to register"
    ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

for d in certs keys secrets; do
  [ -d "$dir/$d" ] || continue
  if [ "$(id -u)" = 0 ]; then chown -R 49999:49999 "$dir/$d"
  else echo "the containers (uid 49999) must read $dir/$d: sudo chown -R 49999:49999 $dir/$d"; fi
done
