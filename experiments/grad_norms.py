"""Per-example gradient norms of the classifier head and of the adapter, at the
shared initial model (why docs/RESULTS.md's DP recipe clips them per group).

    python experiments/grad_norms.py [--data-dir ../shared/data] [--examples 64] [--strategy ffa-lora] [--pooling mean]

Each example alone, plain autograd (no Opacus), on SST-2's validation split
(or the built-in synthetic task if no sst2/ is found), with the main grids'
model settings (MiniLM, LoRA r 8 on query and value, max 32 tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from fedlora.config import parse_run_config
from fedlora.data import encode, load_task
from fedlora.model import build_model, is_head, load_tokenizer
from fedlora.strategies import get_strategy
from fedlora.training import forward_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("FEDLORA_DATA_DIR", "../shared/data"))
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--strategy", default="ffa-lora")
    p.add_argument("--pooling", default="model", choices=["model", "mean"])
    args = p.parse_args()
    run = parse_run_config(
        {
            "data-dir": os.path.abspath(args.data_dir),
            "eval-split": "validation",
            "lora.target-modules": "query,value",
            "max-length": 32,
            "strategy": args.strategy,
            "pooling": args.pooling,
            "seed": 0,
        }
    )
    task = load_task(run.data)
    model = build_model(run, num_labels=len(task.label_names), train_lora_a=get_strategy(args.strategy).train_lora_a)
    model.train()
    data = encode(task.eval, load_tokenizer(run.model), task.text_columns, run.data.max_length)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head, adapter = [], []
    for i in range(min(args.examples, len(data))):
        model.zero_grad(set_to_none=True)
        forward_loss(model, data.batch([i])).backward()
        head.append(sum(float(p.grad.pow(2).sum()) for n, p in params if is_head(n)) ** 0.5)
        adapter.append(sum(float(p.grad.pow(2).sum()) for n, p in params if not is_head(n) and p.grad is not None) ** 0.5)
    share = [a * a / (a * a + h * h) for h, a in zip(head, adapter)]
    model.eval()
    with torch.no_grad():  # how much what the head reads varies from sentence to sentence
        batch = data.batch(list(range(min(args.examples, len(data)))))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        margin = logits[:, 1] - logits[:, 0]
    print(f"{task.source}: {len(head)} examples, {args.strategy}, pooling {args.pooling}, at the initial model (B = 0, seeded head)")
    print(f"head gradient norm     median {statistics.median(head):.3f}  (min {min(head):.3f}, max {max(head):.3f})")
    print(f"adapter gradient norm  median {statistics.median(adapter):.4f}  (min {min(adapter):.4f}, max {max(adapter):.4f})")
    print(f"adapter's share of the squared norm: median {statistics.median(share):.4f}")
    print(f"logit margin across sentences: std {float(margin.std()):.4f}, |mean| {abs(float(margin.mean())):.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
