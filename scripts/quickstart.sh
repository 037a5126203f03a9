#!/usr/bin/env bash
# Install fedlora into ./.venv (if needed) and run the default simulation with
# `flwr run .`: FFA-LoRA, 3 simulated clients, DP at epsilon 3, printing
# accuracy and epsilon every round. Extra arguments are run-config overrides,
# e.g.  scripts/quickstart.sh strategy='"lora"' dp.epsilon=1.0
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first: on a machine without it, a plain `torch` requirement pulls a
# large CUDA build. FEDLORA_TORCH picks another spec (e.g. a CUDA build you want).
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${FEDLORA_TORCH:-torch==2.13.0}"
.venv/bin/python -c "import fedlora, pytest" 2>/dev/null || .venv/bin/pip install -q -e ".[test]"
. .venv/bin/activate
exec scripts/flwr-sim.sh "$@"
