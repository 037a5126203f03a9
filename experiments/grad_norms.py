"""Per-example gradient norms of the classifier head and of the adapter, at the
shared initial model (why docs/RESULTS.md's DP recipe clips them per group) or
at a run's last checkpoint (how many examples each group's clipping norm cuts).

    python experiments/grad_norms.py [--data-dir ../shared/data] [--examples 64] [--strategy ffa-lora] [--pooling mean]
    python experiments/grad_norms.py --run experiments/results/sst2-dp-ema/seed=0 --split train --examples 100

Each example alone, plain autograd (no Opacus), on SST-2's validation split
(or the built-in synthetic task if no sst2/ is found), with the main grids'
model settings (MiniLM, LoRA r 8 on query and value, max 32 tokens). With
--run, the run's own model settings and the global arrays of its latest
checkpoint (its run folder must still hold them; they are not committed), and
the examples are spread evenly over the first 6,000 of the split.
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedlora.config import parse_run_config
from fedlora.data import encode, load_task
from fedlora.model import build_model, is_head, load_tokenizer
from fedlora.run_folder import RunFolder
from fedlora.strategies import get_strategy
from fedlora.training import forward_loss
from fedlora.wire import load_arrays


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("FEDLORA_DATA_DIR", "../shared/data"))
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--strategy", default="ffa-lora")
    p.add_argument("--pooling", default="model", choices=["model", "mean"])
    p.add_argument("--run", help="a run folder: its config.json's model settings and its latest checkpoint's arrays")
    p.add_argument("--split", default="validation", choices=["train", "validation"])
    args = p.parse_args()
    overrides = {
        "lora.target-modules": "query,value",
        "max-length": 32,
        "strategy": args.strategy,
        "pooling": args.pooling,
        "seed": 0,
    }
    if args.run:
        saved = RunFolder(args.run).read_json("config.json")["run-config"]
        model_keys = ("model", "pooling", "model-dropout", "lora.r", "lora.alpha", "lora.dropout", "lora.target-modules")
        overrides = {k: saved[k] for k in (*model_keys, "strategy", "max-length", "seed", "dp.clipping", "dp.max-grad-norm", "dp.head-share")}
    run = parse_run_config({**overrides, "data-dir": os.path.abspath(args.data_dir), "eval-split": "validation"})
    task = load_task(run.data)
    model = build_model(run, num_labels=len(task.label_names), train_lora_a=get_strategy(run.strategy).train_lora_a)
    where = "at the initial model (B = 0, seeded head)"
    if args.run:  # read-only (RunFolder.read_checkpoint would also trim the run's metrics)
        folder = RunFolder(args.run)
        ckpt = folder.read_json("checkpoint.json")
        with np.load(folder.file(ckpt["arrays"])) as npz:
            arrays = ArrayRecord({k: Array(npz[k]) for k in npz.files if not k.startswith("ema:")})
        load_arrays(model, arrays)
        where = f"at {args.run}'s round-{ckpt['round']} checkpoint"
    model.train()
    examples = task.train if args.split == "train" else task.eval
    data = encode(examples, load_tokenizer(run.model), task.text_columns, run.data.max_length)
    count = min(args.examples, len(data))
    stride = max(1, min(6000, len(data)) // count) if args.run else 1
    picked = list(range(0, count * stride, stride))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head, adapter = [], []
    for i in picked:
        model.zero_grad(set_to_none=True)
        forward_loss(model, data.batch([i])).backward()
        head.append(sum(float(p.grad.pow(2).sum()) for n, p in params if is_head(n)) ** 0.5)
        adapter.append(sum(float(p.grad.pow(2).sum()) for n, p in params if not is_head(n) and p.grad is not None) ** 0.5)
    share = [a * a / (a * a + h * h) for h, a in zip(head, adapter)]
    model.eval()
    with torch.no_grad():  # how much what the head reads varies from sentence to sentence
        batch = data.batch(picked)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        margin = logits[:, 1] - logits[:, 0]
    print(f"{task.source} ({args.split}): {len(head)} examples, {run.strategy}, pooling {run.pooling.value}, max-length {run.data.max_length}, {where}")
    print(f"head gradient norm     median {statistics.median(head):.3f}  (min {min(head):.3f}, max {max(head):.3f})")
    print(f"adapter gradient norm  median {statistics.median(adapter):.4f}  (min {min(adapter):.4f}, max {max(adapter):.4f})")
    print(f"adapter's share of the squared norm: median {statistics.median(share):.4f}")
    if args.run and run.dp.clipping == "per-group":
        for label, norms, bound in zip(("head", "adapter"), (head, adapter), run.dp.group_norms(), strict=True):
            cut = sorted(norms)[len(norms) * 9 // 10]
            print(f"{label}: 90th percentile {cut:.3f}; {sum(x > bound for x in norms)} of {len(norms)} examples above the run's norm {bound:.3f}")
    print(f"logit margin across sentences: std {float(margin.std()):.4f}, |mean| {abs(float(margin.mean())):.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
