"""Check a finished run: complete metrics, and final accuracy above the
majority-class baseline of its evaluation split. Exit 1 otherwise.

    python scripts/check_run.py outputs/<run-name>
"""

import json
import os
import sys


def check(run_dir: str) -> str:
    config = json.load(open(os.path.join(run_dir, "config.json")))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rounds = config["resolved"]["num_server_rounds"]
    if [r["round"] for r in rows] != list(range(rounds + 1)):
        raise SystemExit(f"{run_dir}: metrics for rounds {[r['round'] for r in rows]}, expected 0..{rounds}")
    if not os.path.isfile(os.path.join(run_dir, "adapter", "adapter_config.json")):
        raise SystemExit(f"{run_dir}: no adapter saved")
    acc, majority = rows[-1]["accuracy"], config["data"]["eval-majority-accuracy"]
    line = f"{run_dir}: {config['data']['source']} final accuracy {acc:.4f} vs majority class {majority:.4f}, epsilon {rows[-1]['epsilon']:.3f}"
    if config["data"]["synthetic"]:
        raise SystemExit(line + ": ran on the synthetic fallback, not the real data")
    if acc <= majority:
        raise SystemExit(line + ": does not beat the majority class")
    return line


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for d in sys.argv[1:]:
        print(check(d))
