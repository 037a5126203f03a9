"""Soak: a long simulation keeps memory flat.

    python benchmarks/soak.py [--rounds 50] [--clients 10]

Runs a seeded DP FFA-LoRA simulation of a tiny randomly initialised BERT (with
MiniLM's tokenizer) on the built-in synthetic task, records the resident memory
(RSS) of this process and all its children (Ray's workers included) after every
round, and prints the growth from the end of warm-up (round 5) to the last round.
Goal: under 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fedlora import experiment, synthetic  # noqa: E402
from fedlora.simulation import simulate  # noqa: E402

WARMUP = 5


def tree_rss() -> int:
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def tiny_model(directory: str) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora.model import packaged_model_path

    tok = AutoTokenizer.from_pretrained(packaged_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    BertForSequenceClassification(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--clients", type=int, default=10)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fedlora-soak-")
    data = os.path.join(work, "data")
    os.makedirs(data)
    for split, rows in synthetic.make_splits(seed=3, n_train=2000, n_eval=200).items():
        with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    rss: dict[int, int] = {}
    original = experiment.Experiment.evaluate_round

    def record(self, server_round, arrays):
        out = original(self, server_round, arrays)
        rss[server_round] = tree_rss()
        return out

    experiment.Experiment.evaluate_round = record
    simulate(
        {
            "model": tiny_model(os.path.join(work, "model")),
            "dataset": data,
            "output-dir": os.path.join(work, "out"),
            "cache-dir": os.path.join(work, "cache"),
            "num-server-rounds": args.rounds,
            "local-steps": 2,
            "batch-size": 16,
            "max-length": 32,
            "dp.epsilon": 8.0,
            "min-train-nodes": args.clients,
        },
        num_supernodes=args.clients,
        cpus_per_client=1,
    )
    start, end = rss[WARMUP], rss[args.rounds]
    mib = 1024 * 1024
    print("round  RSS(MiB)")
    for r in sorted(rss):
        if r in (0, 1, WARMUP) or r % 10 == 0 or r == args.rounds:
            print(f"{r:5d}  {rss[r] / mib:8.1f}")
    print(
        f"RSS growth after warm-up (round {WARMUP} -> {args.rounds}, {args.clients} clients): "
        f"{start / mib:.1f} MiB -> {end / mib:.1f} MiB = {100 * (end - start) / start:+.1f}%  (goal < 10%)"
    )


if __name__ == "__main__":
    main()
