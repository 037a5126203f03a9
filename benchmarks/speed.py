"""Speed and communication benchmarks; each prints ratios measured side by side in one run.

    python benchmarks/speed.py [--data-dir DIR] [--steps N] [--skip-simulation] [--skip-deployment]

1. DP-SGD step time / non-DP step time, same model (MiniLM with LoRA, and
   with FFA-LoRA) and batch (16 and 64, x 64 tokens), interleaved.  goal <= 1.05
2. Client round wall time / pure training time in a Flower simulation
   (rounds after the first; round 1 includes building the node).  goal <= 1.10
   The same ratio when every round starts a fresh process (deployment, where
   a ClientApp process may start per message), with the token cache on disk.
3. Upload bytes per client per round, FFA-LoRA / LoRA, head frozen. goal = 0.5
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fedlora import privacy, training, wire  # noqa: E402
from fedlora.config import parse_run_config  # noqa: E402
from fedlora.data import Encoded  # noqa: E402
from fedlora.model import build_model  # noqa: E402


def _batch(batch_size: int, seq: int) -> Encoded:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch_size, seq), generator=g)
    return Encoded({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids), "labels": torch.arange(batch_size) % 2})


def dp_step_ratio(steps: int, train_lora_a: bool, batch_size: int, blocks: int = 8) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    run = parse_run_config({"strategy": "lora" if train_lora_a else "ffa-lora"})
    enc = _batch(batch_size, 64)
    idx = list(range(batch_size))
    plain = build_model(run, 2, train_lora_a=train_lora_a)
    private = build_model(run, 2, train_lora_a=train_lora_a)
    gsm = privacy.wrap_model(private)
    ledger = privacy.PrivacyLedger(3.0, 1e-5, noise_multiplier=1.0, sample_rate=0.01, planned_steps=10**6)
    opt_plain = training.make_optimizer([p for p in plain.parameters() if p.requires_grad], run.train)
    opt_dp = privacy.dp_optimizer(training.make_optimizer([p for p in private.parameters() if p.requires_grad], run.train), ledger, 1.0, batch_size, None)
    times = {"plain": [], "dp": []}
    for model, opt in ((plain, opt_plain), (gsm, opt_dp)):  # warm-up
        training.train(model, enc, [idx] * 2, opt, 2)
    for _ in range(blocks):  # interleaved so machine noise hits both alike
        for name, model, opt in (("plain", plain, opt_plain), ("dp", gsm, opt_dp)):
            r = training.train(model, enc, [idx] * steps, opt, steps)
            times[name].append(r.seconds / steps)
    plain_s, dp_s = statistics.median(times["plain"]), statistics.median(times["dp"])
    return {"plain_step_s": plain_s, "dp_step_s": dp_s, "ratio": dp_s / plain_s}


def upload_ratio() -> dict:
    sizes = {}
    for strategy, train_a in (("ffa-lora", False), ("lora", True)):
        run = parse_run_config({"strategy": strategy, "train-head": False})
        sizes[strategy] = wire.nbytes(wire.to_arrays(build_model(run, 2, train_lora_a=train_a)))
    return {"ffa_bytes": sizes["ffa-lora"], "lora_bytes": sizes["lora"], "ratio": sizes["ffa-lora"] / sizes["lora"]}


def secure_noise_seconds(train_lora_a: bool, repeats: int = 20) -> tuple[int, float]:
    """Per-step cost of deployments' noise from os.urandom, for a method's trainable tensors."""
    run = parse_run_config({"strategy": "lora" if train_lora_a else "ffa-lora"})
    shapes = [tuple(p.shape) for p in build_model(run, 2, train_lora_a=train_lora_a).parameters() if p.requires_grad]
    start = time.perf_counter()
    for _ in range(repeats):
        for shape in shapes:
            privacy.secure_gaussian(shape, 1.0)
    return sum(int(torch.Size(s).numel()) for s in shapes), (time.perf_counter() - start) / repeats


def simulation_ratio(data_dir: str | None, rounds: int, steps: int) -> dict:
    from fedlora.simulation import simulate

    out = tempfile.mkdtemp(prefix="fedlora-bench-")
    overrides = {
        "num-server-rounds": rounds, "local-steps": steps, "output-dir": out, "run-name": "bench",
        "cache-dir": os.path.join(out, "cache"), "dp.epsilon": 3.0, "num-partitions": 2,
    }
    if data_dir:
        overrides["data-dir"] = data_dir
    simulate(overrides, num_supernodes=2)
    (run_dir,) = glob.glob(os.path.join(out, "bench*"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][1:]
    later = [m["client-seconds"] / m["train-seconds"] for r in rows[1:] for m in r["client_metrics"].values()]
    first = [m["client-seconds"] / m["train-seconds"] for m in rows[0]["client_metrics"].values()]
    return {"run_dir": run_dir, "ratio_later_rounds": statistics.median(later), "ratio_round1": statistics.median(first), "client_rounds": len(later)}


_FRESH_PROCESS = r"""
import time; t0 = time.perf_counter()
import json, sys
from flwr.app import ArrayRecord
from fedlora import node, wire
from fedlora.config import parse_run_config
t_import = time.perf_counter()
run = parse_run_config(json.loads(sys.argv[1]))
rt = node.get_runtime(run, {"partition-id": 0, "num-partitions": 2}, ("0", "1"), train_lora_a=False)
ledger = node.plan_ledger(rt)
arrays, m = node.train_round(rt, wire.to_arrays(rt.model), 1, ledger)
t_end = time.perf_counter()
print(json.dumps({"total": t_end - t0, "after_imports": t_end - t_import, "train": m["train-seconds"]}))
"""


def deployment_ratio(data_dir: str | None, steps: int, rounds: int = 3) -> dict:
    """Each round in a fresh Python process, as a per-message ClientApp process would be."""
    cache = tempfile.mkdtemp(prefix="fedlora-bench-cache-")
    cfg = {"local-steps": steps, "cache-dir": cache, "dp.epsilon": 3.0, "num-partitions": 2, **({"data-dir": data_dir} if data_dir else {})}
    runs = []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, json.dumps(cfg)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    later = runs[1:]  # the first process also tokenises and fills the disk cache
    return {
        "ratio_with_imports": statistics.median(r["total"] / r["train"] for r in later),
        "ratio_after_imports": statistics.median(r["after_imports"] / r["train"] for r in later),
        "ratio_first_process": runs[0]["total"] / runs[0]["train"],
        "train_s": statistics.median(r["train"] for r in later),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("FEDLORA_DATA_DIR"), help="folder with sst2/ (else the synthetic fallback)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timing block / local steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--skip-steps", action="store_true", help="skip [1], the DP step timing (the slowest part)")
    ap.add_argument("--skip-simulation", action="store_true")
    ap.add_argument("--skip-deployment", action="store_true")
    args = ap.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    # Batch 16 (the guide's reference measurement) and the run default, 64.
    for batch_size in () if args.skip_steps else (16, 64):
        for name, train_a in (("LoRA", True), ("FFA-LoRA", False)):
            r = dp_step_ratio(args.steps if batch_size == 16 else max(2, args.steps // 2), train_a, batch_size)
            print(f"[1] DP step / non-DP step ({name}, MiniLM, batch {batch_size} x 64 tokens): {r['dp_step_s']:.4f}s / {r['plain_step_s']:.4f}s = {r['ratio']:.3f}  (goal <= 1.05)", flush=True)
    u = upload_ratio()
    print(f"[3] upload bytes per client per round, FFA-LoRA / LoRA (head frozen): {u['ffa_bytes']} / {u['lora_bytes']} = {u['ratio']:.4f}  (goal 0.5)", flush=True)
    for name, train_a in (("LoRA", True), ("FFA-LoRA", False)):
        n, secs = secure_noise_seconds(train_a)
        print(f"[1'] deployment DP noise from os.urandom, {name} ({n} trainable values): {1000 * secs:.1f} ms per step", flush=True)
    if not args.skip_simulation:
        s = simulation_ratio(args.data_dir, args.rounds, args.steps)
        print(f"[2] simulation client round wall / training time: {s['ratio_later_rounds']:.3f} median over {s['client_rounds']} client-rounds after round 1 "
              f"(round 1, building the node: {s['ratio_round1']:.2f})  (goal <= 1.10)", flush=True)
    if not args.skip_deployment:
        d = deployment_ratio(args.data_dir, args.steps)
        print(f"[2'] deployment, fresh process per round, token cache on disk: wall / training = {d['ratio_with_imports']:.2f} "
              f"({d['ratio_after_imports']:.2f} after Python imports; first process, tokenising: {d['ratio_first_process']:.2f}; training {d['train_s']:.2f}s)", flush=True)


if __name__ == "__main__":
    main()
