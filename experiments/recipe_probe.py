"""A quick probe for choosing the DP recipe: ONE client's partition (1 of 3, IID,
seed 0) trained round after round exactly as a node trains (``fedlora.node``,
DP-SGD, its own ledger), evaluated on SST-2's validation split after each round.
No Flower, no averaging across clients (so its noise is sqrt(3) larger than a
3-client federation's): it ranks settings in ~4 minutes, it does not replace the
federated runs (experiments/sst2-dp.toml).

    python experiments/recipe_probe.py '{"optimizer": "adamw", "learning-rate": 0.005}' [--data-dir ../shared/data]

The JSON object overrides the probe's base config (the recipe's shape: expected
batches of 512 in micro-batches of 32, 6 rounds x 4 local steps, epsilon 3).
Prints one line per round and a final ``PROBE {config} [accuracies]`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from fedlora import node, wire
from fedlora.config import parse_run_config
from fedlora.data import encode, load_task
from fedlora.model import load_tokenizer
from fedlora.strategies import get_strategy
from fedlora.training import evaluate

BASE = {
    "eval-split": "validation",
    "lora.target-modules": "query,value",
    "max-length": 32,
    "batch-size": 512,
    "micro-batch-size": 32,
    "local-steps": 4,
    "num-server-rounds": 6,
    "seed": 0,
    "strategy": "ffa-lora",
    "dp.epsilon": 3.0,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", help="run-config overrides, a JSON object")
    p.add_argument("--data-dir", default=os.environ.get("FEDLORA_DATA_DIR", "../shared/data"))
    args = p.parse_args()
    overrides = json.loads(args.overrides)
    run = parse_run_config({**BASE, "dataset": os.path.join(os.path.abspath(args.data_dir), "sst2"), **overrides})
    task = load_task(run.data)
    method = get_strategy(run.strategy)
    rt = node.get_runtime(run, {"partition-id": 0, "num-partitions": 3}, tuple(task.label_names), method.train_lora_a)
    eval_data = encode(task.eval, load_tokenizer(run.model), task.text_columns, run.data.max_length)
    ledger = node.plan_ledger(rt) if run.dp.enabled else None
    arrays, accuracies, start = wire.to_arrays(rt.model), [], time.time()
    for r in range(1, run.num_server_rounds + 1):
        arrays, metrics = node.train_round(rt, arrays, r, ledger)  # the round's result stays in rt.model
        accuracies.append(round(evaluate(rt.model, eval_data, 128)["accuracy"], 3))
        print(f"round {r} accuracy {accuracies[-1]:.3f} epsilon {metrics['epsilon']:.2f} after {time.time() - start:.0f} s", flush=True)
    print("PROBE", json.dumps(overrides), accuracies)


if __name__ == "__main__":
    main()
