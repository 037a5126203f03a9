"""DP-SGD step time with LoRA in every block and in the top blocks only (``lora.layers``),
measured side by side in one run.

    python benchmarks/layers.py [--data-dir DIR] [--layers=-3,-2,-1] [--steps 8] [--batch-size 512] [--micro 32]

The steps of the DP recipe (docs/RESULTS.md, ``experiments/sst2-dp-layers.toml``):
FFA-LoRA on MiniLM's query and value, mean pooling, dropout off, expected batches
of ``--batch-size`` Poisson-sampled from SST-2's training split (the synthetic task
if no SST-2 is found) at max-length 64, in length-sorted micro-batches of
``--micro``, DP-SGD (AdamW) with flat clipping at 0.5 and seeded noise. Both models
take the same batches, one step each in turn, the first alternating. Prints each
way's trained values and median seconds per step, and top blocks / every block.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from speed import load_sst2, set_flush  # noqa: E402  (speed.py: SST-2 tokenised as a run does, denormals)

from fedlora import privacy, training  # noqa: E402
from fedlora.config import parse_run_config  # noqa: E402
from fedlora.model import build_model  # noqa: E402

RECIPE = {"pooling": "mean", "model-dropout": 0.0, "strategy": "ffa-lora", "lora.target-modules": "query,value", "optimizer": "adamw", "learning-rate": 0.02}


def step_seconds(layers: str, batch_size: int, micro: int, steps: int, data_dir: str | None) -> dict:
    """Median seconds per DP step (after one warm-up step) of every way in ``("", layers)``."""
    train, _, source = load_sst2(data_dir)
    rate = batch_size / len(train)
    batches = list(privacy.poisson_batches(len(train), rate, steps + 1, torch.Generator().manual_seed(0)))
    ways = {}
    for spec in ("", layers):
        run = parse_run_config({**RECIPE, "lora.layers": spec})
        model = build_model(run, 2, train_lora_a=False)
        params = [p for p in model.parameters() if p.requires_grad]
        gsm = privacy.wrap_model(model)
        ledger = privacy.PrivacyLedger(3.0, 1e-5, noise_multiplier=0.9, sample_rate=rate, planned_steps=10**6)
        opt = privacy.dp_optimizer(training.make_optimizer(params, run.train), ledger, 0.5, batch_size, torch.Generator().manual_seed(1))
        ways[spec] = {"gsm": gsm, "opt": opt, "trained": sum(p.numel() for p in params), "seconds": []}
    for i, idx in enumerate(batches):
        order = ("", layers) if i % 2 == 0 else (layers, "")
        for spec in order:
            w = ways[spec]
            s = training.train(w["gsm"], train, [idx], w["opt"], 1, micro_batch_size=micro).seconds
            if i > 0:  # the first step warms both up
                w["seconds"].append(s)
    for w in ways.values():
        w["gsm"]._close()
    return {
        "source": source,
        "examples": len(train),
        **{spec: {"trained": w["trained"], "median_s": statistics.median(w["seconds"])} for spec, w in ways.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("FEDLORA_DATA_DIR"), help="folder with sst2/ (else the synthetic task)")
    ap.add_argument("--layers", default="-3,-2,-1", help="the blocks of the second way (lora.layers)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per way (after one warm-up step)")
    ap.add_argument("--batch-size", type=int, default=512, help="expected Poisson batch")
    ap.add_argument("--micro", type=int, default=32, help="micro-batch size")
    args = ap.parse_args()
    set_flush(True)  # training's default on CPU
    r = step_seconds(args.layers, args.batch_size, args.micro, args.steps, args.data_dir)
    every, top = r[""], r[args.layers]
    print(
        f"data: {r['source']}, {r['examples']} training examples; expected batch {args.batch_size}, micro-batches of {args.micro}, {args.steps} timed steps per way"
    )
    print("| LoRA in | trained values | median s per DP step |")
    print("|---|---|---|")
    print(f"| every block | {every['trained']:,} | {every['median_s']:.3f} |")
    print(f"| lora.layers = {args.layers} | {top['trained']:,} | {top['median_s']:.3f} |")
    print(f"top blocks / every block: x{top['median_s'] / every['median_s']:.2f} per step")


if __name__ == "__main__":
    main()
