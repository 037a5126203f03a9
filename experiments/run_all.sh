#!/usr/bin/env bash
# Every grid behind docs/RESULTS.md, in order, then the tables and the HTML
# reports. Resumable: rerun it to continue an interrupted grid (complete runs
# are skipped, a run with a checkpoint resumes from its last round).
#   FEDLORA_DATA_DIR=/path/to/data experiments/run_all.sh    (default: ../shared/data)
set -uo pipefail
cd "$(dirname "$0")/.."
export FEDLORA_DATA_DIR="${FEDLORA_DATA_DIR:-$(cd ../shared/data 2>/dev/null && pwd)}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d "$FEDLORA_DATA_DIR/sst2" ] || { echo "no SST-2 under FEDLORA_DATA_DIR=$FEDLORA_DATA_DIR" >&2; exit 2; }
[ -x .venv/bin/fedlora ] && PATH="$PWD/.venv/bin:$PATH"
status=0
for grid in sst2-recipe sst2-dp-rates sst2-dp sst2-dp-rounds sst2-dp-long sst2-dp-dropout sst2-dp-goal sst2-dp-schedule sst2-dp-reach sst2-dp-ema sst2-dp-share sst2-dp-alpha sst2-sweep sst2 sst2-nonprivate sst2-alpha rte sst2-methods sst2-wire smollm2-sst2; do
  fedlora compare "experiments/$grid.toml" || status=1
done
python experiments/results_tables.py > experiments/results/tables.md
for grid in sst2-recipe sst2-dp-rates sst2-dp sst2-dp-rounds sst2-dp-long sst2-dp-dropout sst2-dp-goal sst2-dp-schedule sst2-dp-reach sst2-dp-ema sst2-dp-share sst2-dp-alpha sst2-sweep sst2 sst2-nonprivate sst2-alpha rte sst2-methods sst2-wire smollm2-sst2; do
  [ -d "experiments/results/$grid" ] && fedlora report "experiments/results/$grid" --title "fedlora: $grid"
done
exit $status
