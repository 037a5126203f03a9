"""Token lengths of a task's splits under the model's tokenizer, and the share of
sentences that a ``max-length`` truncates (docs/RESULTS.md, "The DP recipe").

    python experiments/token_lengths.py [--data-dir ../shared/data] [--dataset sst2] [--max-length 32 64]

SST-2's training split holds phrases as well as sentences, its validation split
whole sentences, so a limit that suits training can cut the sentences that are
evaluated.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from fedlora.config import parse_run_config
from fedlora.data import load_task
from fedlora.model import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("FEDLORA_DATA_DIR", "../shared/data"))
    p.add_argument("--dataset", default="sst2")
    p.add_argument("--max-length", type=int, nargs="+", default=[32, 64])
    args = p.parse_args()
    run = parse_run_config({"dataset": os.path.join(os.path.abspath(args.data_dir), args.dataset), "eval-split": "validation"})
    task = load_task(run.data)
    tok = load_tokenizer(run.model)
    cols = task.text_columns
    print("split | sentences | mean tokens | median | 95th percentile | " + " | ".join(f"share > {m}" for m in args.max_length))
    for name, ds in (("train", task.train), ("validation", task.eval)):
        texts = [list(ds[c]) for c in cols]
        enc = tok(*texts, truncation=False)["input_ids"]
        lengths = np.array([len(ids) for ids in enc])
        shares = " | ".join(f"{(lengths > m).mean():.3f}" for m in args.max_length)
        print(f"{name} | {len(lengths)} | {lengths.mean():.1f} | {np.median(lengths):.0f} | {np.percentile(lengths, 95):.0f} | {shares}")


if __name__ == "__main__":
    main()
