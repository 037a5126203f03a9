#!/usr/bin/env bash
# Run the app as a local Flower simulation with `flwr run .`, the way Flower 1.42
# does it, minus its traps: an isolated FLWR_HOME, no per-run dependency
# installation (it would pull a CUDA torch), a check of the run's real status
# (`flwr run` exits 0 even when the run fails), and the local SuperLink that
# `flwr run` starts is stopped afterwards.
#
#   scripts/flwr-sim.sh [key=value ...]     run-config overrides, TOML values:
#   scripts/flwr-sim.sh strategy='"lora"' dp.epsilon=1.0 num-server-rounds=10
#
# Environment: FEDLORA_NODES (default 3 simulated nodes: Flower's num-supernodes;
# each node reads its partition-id and num-partitions from its node config),
# FEDLORA_CPUS_PER_CLIENT (CPUs per simulated client, a whole number, default: all
# CPUs / nodes, at least 1; FEDLORA_CLIENT_CPUS is the older name),
# FEDLORA_GPUS_PER_CLIENT (GPUs per simulated client, e.g. 0.25: four clients share
# one GPU; unset: Flower's default, 0, and Ray hides the GPUs from the clients).
# They become Flower's federation config client-resources-num-cpus / -num-gpus.
set -euo pipefail
cd "$(dirname "$0")/.."

export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1
# Our own local SuperLink ports, so an unrelated SuperLink on the defaults is never reused.
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39191}"
export FLWR_LOCAL_CONTROL_API_PORT="${FLWR_LOCAL_CONTROL_API_PORT:-39193}"
nodes="${FEDLORA_NODES:-3}"
cpus="${FEDLORA_CPUS_PER_CLIENT:-${FEDLORA_CLIENT_CPUS:-}}"
gpus="${FEDLORA_GPUS_PER_CLIENT:-}"
# Checked here: Flower's own errors for these are a stack trace after the SuperLink started.
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "FEDLORA_NODES=$nodes: must be a whole number >= 1" >&2; exit 2; }
if [ -z "$cpus" ]; then
  cpus=$(( $(nproc) / nodes > 0 ? $(nproc) / nodes : 1 ))
elif ! [[ "$cpus" =~ ^[1-9][0-9]*$ ]]; then
  echo "FEDLORA_CPUS_PER_CLIENT=$cpus: must be a whole number >= 1 (Flower's client-resources-num-cpus)" >&2; exit 2
fi
federation="num-supernodes=$nodes client-resources-num-cpus=$cpus"
if [ -n "$gpus" ]; then
  # Ray takes a fraction below 1 (clients share a GPU) or a whole number of GPUs.
  [[ "$gpus" =~ ^([0-9]+(\.0+)?|0?\.[0-9]+)$ ]] || {
    echo "FEDLORA_GPUS_PER_CLIENT=$gpus: must be a fraction below 1 (e.g. 0.25) or a whole number (Flower's client-resources-num-gpus)" >&2; exit 2; }
  [[ "$gpus" == .* ]] && gpus="0$gpus"  # TOML needs the leading 0
  federation+=" client-resources-num-gpus=$gpus"
fi
mkdir -p "$FLWR_HOME" outputs

# Only the SuperLink `flwr run` starts for this FLWR_HOME (its command line names
# its log file there): other SuperLinks on this machine are left alone.
mine_superlinks() {
  for pid in $(pgrep -f "flower-superlink" || true); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$FLWR_HOME/local-superlink/" && echo "$pid"
  done
  return 0
}
stop_superlink() {
  local mine
  mine=$(mine_superlinks)
  [ -n "$mine" ] || return 0
  kill $mine 2>/dev/null || true
  for _ in $(seq 20); do  # it shuts down gracefully within a few seconds
    kill -0 $mine 2>/dev/null || return 0
    sleep 0.5
  done
  kill -9 $mine 2>/dev/null || true
}
trap stop_superlink EXIT

# One --run-config per pair: Flower rejects a key repeated within one string,
# and a later --run-config overrides an earlier one, so the caller's pairs win.
overrides=(--run-config "output-dir=\"$PWD/outputs\"")
[ -n "${FEDLORA_DATA_DIR:-}" ] && overrides+=(--run-config "data-dir=\"$FEDLORA_DATA_DIR\"")
for kv in "$@"; do overrides+=(--run-config "$kv"); done

started=$(date +%s)
echo "federation config: $federation"
flwr run . --stream "${overrides[@]}" --federation-config "$federation"

# The newest run's status is the truth.
status=$(flwr ls --format json | python3 -c '
import json, sys
runs = json.load(sys.stdin).get("runs", [])
runs.sort(key=lambda r: int(r.get("run-id", 0)) if str(r.get("run-id", "")).isdigit() else 0)
newest = max(runs, key=lambda r: r.get("pending-at") or r.get("created-at") or "", default={})
print(newest.get("status", "unknown"), "|", newest.get("status-details", ""))
')
echo "flwr run finished in $(( $(date +%s) - started ))s: $status"
case "$status" in
  finished:completed*) exit 0 ;;
  *) echo "the run did not complete (see the log above and 'FLWR_HOME=$FLWR_HOME flwr log')" >&2; exit 1 ;;
esac
