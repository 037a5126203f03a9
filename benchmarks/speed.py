"""Speed and communication benchmarks; each prints ratios measured side by side in one run.

    python benchmarks/speed.py [--data-dir DIR] [--dp-steps N] [--block N] [--flush on|off|both] [--lora-64] [--only lora-16,...]
                               [--throughput-steps N] [--accuracy-steps N] [--steps N] [--rounds N]
                               [--skip-steps] [--skip-padding] [--skip-simulation] [--skip-deployment]

1. DP-SGD step time / non-DP step time, same model (MiniLM with LoRA, and
   with FFA-LoRA), batch (16 and 64, x 64 tokens) and weights: the DP run
   trains on, and before each block of timed steps the non-DP model is loaded
   with the DP model's current weights, so both time the same state as it
   drifts over dozens of steps.                                    goal <= 1.05
   With denormal floats flushed to zero (training's default on CPU), and/or
   not (--flush).
1p. SST-2 sentences (--data-dir / $FEDLORA_DATA_DIR; else the synthetic
   fallback): the padded share of the tokens computed, for Poisson-sampled
   logical batches of 64 and 512, in one pass and in length-sorted
   micro-batches of 16; and DP-SGD examples per second, both ways, on the
   same batches, interleaved.
1a. (--accuracy-steps N) a short DP FFA-LoRA training on SST-2, with and
   without flushing denormals, from the same weights and seeds: validation
   accuracy and the largest parameter difference.
2. Client round wall time / pure training time in a Flower simulation
   (rounds after the first; round 1 includes building the node).  goal <= 1.10
   The same ratio when every round starts a fresh process (deployment, where
   a ClientApp process may start per message), with the token cache on disk.
3. Upload bytes per client per round, FFA-LoRA / LoRA, head frozen. goal = 0.5
"""

from __future__ import annotations

import argparse
import copy
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

from fedlora import data as data_mod  # noqa: E402
from fedlora import privacy, training, wire  # noqa: E402
from fedlora.config import DPConfig, parse_run_config  # noqa: E402
from fedlora.data import Encoded  # noqa: E402
from fedlora.model import build_model, load_tokenizer  # noqa: E402

MICRO = 16  # the micro-batch size compared with one pass


def _batch(batch_size: int, seq: int) -> Encoded:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch_size, seq), generator=g)
    return Encoded({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids), "labels": torch.arange(batch_size) % 2})


def set_flush(on: bool) -> None:
    """Flush denormals (training's default on CPU) or not, on every thread, from now on."""
    training.FLUSH_DENORMALS = on
    training.set_flush_denormal(on)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _copy_into(model: torch.nn.Module, opt: torch.optim.Optimizer, state: list[torch.Tensor], opt_state: dict) -> None:
    with torch.no_grad():
        for p, s in zip(_trainable(model), state):
            p.copy_(s)
    opt.load_state_dict(copy.deepcopy(opt_state))


def timed_into(fn, timer: list[float], slot: int):
    """``fn``, adding the seconds each call takes to ``timer[slot]``."""

    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timer[slot] += time.perf_counter() - start

    return run


def time_dp_work(gsm: torch.nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    """From now on, add the seconds ``gsm``'s per-sample hooks (forward and backward) and
    ``opt``'s clipping and noise take to the returned one-element list: the DP step's own
    work, timed inside the step, so a VM's drift between steps does not blur it (what it
    misses: any slowdown DP causes in the rest of the step). For ``privacy.wrap_model``'s
    output-tensor hooks, which look their hook methods up on the instance at each call."""
    spent = [0.0]
    for name in ("capture_activations_hook", "capture_backprops_hook"):
        setattr(gsm, name, timed_into(getattr(gsm, name), spent, 0))
    opt.pre_step = timed_into(opt.pre_step, spent, 0)
    return spent


def dp_step_ratio(dp_steps: int, train_lora_a: bool, batch_size: int, flush: bool, block: int = 4, plain_per_block: int = 3) -> dict:
    """DP and non-DP step times on the same weights, along the DP run's trajectory.

    The DP model trains ``dp_steps`` steps in blocks of ``block``; at each
    block's start its weights (and optimizer state) are copied into the non-DP
    model, which then times ``plain_per_block`` steps from there. Which of the
    two goes first alternates, so machine noise hits both alike; a block's
    ratio is the median DP step over the median non-DP step (robust to the
    spikes of a shared machine)."""
    set_flush(flush)
    run = parse_run_config({"strategy": "lora" if train_lora_a else "ffa-lora"})
    enc = _batch(batch_size, 64)
    idx = list(range(batch_size))
    plain = build_model(run, 2, train_lora_a=train_lora_a)
    private = build_model(run, 2, train_lora_a=train_lora_a)
    private.load_state_dict(plain.state_dict())
    gsm = privacy.wrap_model(private)
    ledger = privacy.PrivacyLedger(3.0, 1e-5, noise_multiplier=1.0, sample_rate=0.01, planned_steps=10**6)
    opt_plain = training.make_optimizer(_trainable(plain), run.train)
    opt_dp = privacy.dp_optimizer(training.make_optimizer(_trainable(private), run.train), ledger, 1.0, batch_size, None)
    training.train(gsm, enc, [idx], opt_dp, 1)  # warm-up: the DP run's first step
    dp_work = time_dp_work(gsm, opt_dp)
    ratios, dp_times, plain_times = [], [], []
    for b in range(max(1, dp_steps // block)):
        state = [p.detach().clone() for p in _trainable(private)]
        opt_state = copy.deepcopy(opt_dp.original_optimizer.state_dict())
        times = {}
        for side in ("plain", "dp") if b % 2 == 0 else ("dp", "plain"):
            if side == "plain":
                _copy_into(plain, opt_plain, state, opt_state)
                times[side] = [training.train(plain, enc, [idx], opt_plain, 1).seconds for _ in range(plain_per_block)]
            else:
                times[side] = [training.train(gsm, enc, [idx], opt_dp, 1).seconds for _ in range(block)]
        dp_times += times["dp"]
        plain_times += times["plain"]
        ratios.append(statistics.median(times["dp"]) / statistics.median(times["plain"]))
    gsm._close()
    half = max(1, len(ratios) // 2)
    return {
        "ratio": statistics.median(ratios),
        "ratio_first": statistics.median(ratios[:half]),
        "ratio_last": statistics.median(ratios[-half:]),
        "dp_first_s": statistics.median(dp_times[:block]),
        "dp_last_s": statistics.median(dp_times[-block:]),
        "dp_steps": len(dp_times) + 1,
        # The DP work timed inside the steps (hooks, clipping, noise): mean per DP step, and
        # its share of the median non-DP step.
        "dp_work_s": dp_work[0] / len(dp_times),
        "dp_mean_s": statistics.fmean(dp_times),
        "dp_work_share": dp_work[0] / len(dp_times) / statistics.median(plain_times),
    }


def load_sst2(data_dir: str | None) -> tuple[Encoded, Encoded, str]:
    """SST-2's train and validation splits tokenised as a run does (MiniLM, max-length 64);
    the synthetic task when no SST-2 is found (as a run would)."""
    run = parse_run_config({"data-dir": data_dir} if data_dir else {})
    task = data_mod.load_task(run.data)
    tok = load_tokenizer(run.model)
    enc = [data_mod.encode(ds, tok, task.text_columns, run.data.max_length) for ds in (task.train, task.eval)]
    return enc[0], enc[1], task.source


def padding_share(data: Encoded, batches: list[list[int]], micro: int) -> float:
    """Share of the computed token positions that are padding."""
    lengths = data.tensors["attention_mask"].sum(1)
    real = computed = 0
    for idx in batches:
        for part in training.micro_batches(data, idx, micro):
            ls = lengths[part]
            real += int(ls.sum())
            computed += len(part) * max(int(ls.max()), 1)
    return 1 - real / max(1, computed)


def dp_throughput(data: Encoded, batch_size: int, steps: int, micro: int = MICRO) -> dict:
    """DP FFA-LoRA examples per second, one pass vs length-sorted micro-batches:
    the same Poisson batches, each timed both ways in turn."""
    set_flush(True)
    run = parse_run_config({})
    model = build_model(run, 2, train_lora_a=False)
    gsm = privacy.wrap_model(model)
    rate = batch_size / len(data)
    ledger = privacy.PrivacyLedger(3.0, 1e-5, noise_multiplier=1.0, sample_rate=rate, planned_steps=10**6)
    opt = privacy.dp_optimizer(training.make_optimizer(_trainable(model), run.train), ledger, 1.0, batch_size, torch.Generator().manual_seed(1))
    batches = list(privacy.poisson_batches(len(data), rate, steps + 1, torch.Generator().manual_seed(0)))
    training.train(gsm, data, batches[:1], opt, 1, micro_batch_size=micro)  # warm-up
    seconds, examples = {0: 0.0, micro: 0.0}, 0
    for i, idx in enumerate(batches[1:]):
        for size in (0, micro) if i % 2 == 0 else (micro, 0):
            seconds[size] += training.train(gsm, data, [idx], opt, 1, micro_batch_size=size).seconds
        examples += len(idx)
    gsm._close()
    return {"one_pass": examples / seconds[0], "micro": examples / seconds[micro], "examples": examples}


def flush_accuracy(train: Encoded, evals: Encoded, steps: int, batch_size: int = 64) -> dict:
    """Validation accuracy after ``steps`` DP FFA-LoRA steps (epsilon 3 over them), denormals
    flushed and not, from the same weights with the same sampling and noise."""
    run = parse_run_config({})
    ledger = privacy.PrivacyLedger.plan(DPConfig(epsilon=3.0, delta=1e-5, max_grad_norm=1.0), len(train), batch_size, steps)
    out = {}
    for flush in (False, True):
        set_flush(flush)
        model = build_model(run, 2, train_lora_a=False)
        torch.manual_seed(0)  # MiniLM's dropout draws from the global generator
        if not out:
            out["initial"] = tuple(training.evaluate(model, evals, 64)[k] for k in ("loss", "accuracy"))
        gsm = privacy.wrap_model(model)
        opt = privacy.dp_optimizer(training.make_optimizer(_trainable(model), run.train), ledger, 1.0, batch_size, torch.Generator().manual_seed(1))
        batches = privacy.poisson_batches(len(train), ledger.sample_rate, steps, torch.Generator().manual_seed(0))
        r = training.train(gsm, train, batches, opt, steps, micro_batch_size=MICRO)
        gsm._close()
        out[flush] = tuple(training.evaluate(model, evals, 64)[k] for k in ("loss", "accuracy")), [p.detach().clone() for p in _trainable(model)], r.seconds
    set_flush(True)
    diff = max(float((a - b).abs().max()) for a, b in zip(out[False][1], out[True][1]))
    return {
        "initial": out["initial"],
        "off": out[False][0],
        "on": out[True][0],
        "max_param_diff": diff,
        "sigma": ledger.noise_multiplier,
        "seconds_off": out[False][2],
        "seconds_on": out[True][2],
    }


def upload_ratio() -> dict:
    sizes = {}
    for strategy, train_a in (("ffa-lora", False), ("lora", True)):
        run = parse_run_config({"strategy": strategy, "train-head": False})
        sizes[strategy] = wire.nbytes(wire.to_arrays(build_model(run, 2, train_lora_a=train_a)))
    return {"ffa_bytes": sizes["ffa-lora"], "lora_bytes": sizes["lora"], "ratio": sizes["ffa-lora"] / sizes["lora"]}


def secure_noise_seconds(train_lora_a: bool, repeats: int = 20) -> tuple[int, float]:
    """Per-step cost of deployments' secure noise (privacy.secure_gaussians, one draw for all of a
    method's trainable tensors, as a DP step draws it)."""
    run = parse_run_config({"strategy": "lora" if train_lora_a else "ffa-lora"})
    shapes = [tuple(p.shape) for p in build_model(run, 2, train_lora_a=train_lora_a).parameters() if p.requires_grad]
    start = time.perf_counter()
    for _ in range(repeats):
        privacy.secure_gaussians(shapes, 1.0)
    return sum(int(torch.Size(s).numel()) for s in shapes), (time.perf_counter() - start) / repeats


def secure_bytes_ratio(nbytes: int = 2_400_000, repeats: int = 20) -> tuple[float, float]:
    """Seconds to draw ``nbytes`` (LoRA's per-step need) from privacy.secure_bytes and from
    os.urandom directly, interleaved."""
    chacha, kernel = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        privacy.secure_bytes(nbytes)
        chacha.append(time.perf_counter() - t)
        t = time.perf_counter()
        os.urandom(nbytes)
        kernel.append(time.perf_counter() - t)
    return statistics.median(chacha), statistics.median(kernel)


def simulation_ratio(data_dir: str | None, rounds: int, steps: int) -> dict:
    from fedlora.simulation import simulate

    out = tempfile.mkdtemp(prefix="fedlora-bench-")
    overrides = {
        "num-server-rounds": rounds,
        "local-steps": steps,
        "output-dir": out,
        "run-name": "bench",
        "cache-dir": os.path.join(out, "cache"),
        "dp.epsilon": 3.0,
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
    cfg = {"local-steps": steps, "cache-dir": cache, "dp.epsilon": 3.0, **({"data-dir": data_dir} if data_dir else {})}
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
    ap.add_argument("--steps", type=int, default=10, help="local steps per round in [2]")
    ap.add_argument("--dp-steps", type=int, default=24, help="[1]: DP steps per configuration at batch 16 (half that at batch 64)")
    ap.add_argument("--flush", choices=("on", "off", "both"), default="on", help="[1]: flush denormals to zero (training's default on CPU), or not, or both")
    ap.add_argument(
        "--block",
        type=int,
        default=4,
        help="[1]: DP steps per timing block (each against max(1, N-1) plain steps from the block's weights); 1 pairs every DP step with one plain step",
    )
    ap.add_argument("--lora-64", action="store_true", help="[1]: also time LoRA at batch 64 (FFA-LoRA, the default method, always)")
    ap.add_argument(
        "--only",
        default="",
        help="[1]: time only these, comma-separated, of lora-16, ffa-lora-16, lora-64, ffa-lora-64 (e.g. to repeat the closest one)",
    )
    ap.add_argument("--throughput-steps", type=int, default=6, help="[1p]: Poisson batches of 64 timed each way")
    ap.add_argument("--accuracy-steps", type=int, default=0, help="[1a]: DP steps of the flush / no-flush accuracy check (0 = skip)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--skip-steps", action="store_true", help="skip [1], the DP step timing (the slowest part)")
    ap.add_argument("--skip-padding", action="store_true", help="skip [1p] (padding and DP throughput on SST-2)")
    ap.add_argument("--skip-simulation", action="store_true")
    ap.add_argument("--skip-deployment", action="store_true")
    args = ap.parse_args()
    if args.block < 1:
        ap.error(f"--block {args.block}: must be at least 1 (DP steps per timing block)")

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    flushes = {"on": (True,), "off": (False,), "both": (True, False)}[args.flush]
    # Batch 16 (the guide's reference measurement) and the run default, 64.
    configs = [(16, "LoRA", True), (16, "FFA-LoRA", False), *([(64, "LoRA", True)] if args.lora_64 else []), (64, "FFA-LoRA", False)]
    if args.only:
        every = {
            f"{name.lower()}-{b}": (b, name, a) for b, name, a in [(16, "LoRA", True), (16, "FFA-LoRA", False), (64, "LoRA", True), (64, "FFA-LoRA", False)]
        }
        unknown = set(args.only.split(",")) - set(every)
        if unknown:
            ap.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(every)}")
        configs = [every[k] for k in args.only.split(",")]
    for batch_size, name, train_a in () if args.skip_steps else configs:
        for flush in flushes:
            steps = args.dp_steps if batch_size == 16 else max(4, args.dp_steps // 2)
            r = dp_step_ratio(steps, train_a, batch_size, flush, block=args.block, plain_per_block=max(1, args.block - 1))
            print(
                f"[1] DP step / non-DP step, same weights ({name}, MiniLM, batch {batch_size} x 64 tokens, denormals {'flushed' if flush else 'kept'}): "
                f"{r['ratio']:.3f} median over {r['dp_steps']} DP steps (first half {r['ratio_first']:.3f}, last half {r['ratio_last']:.3f}; "
                f"DP step {r['dp_first_s']:.3f}s -> {r['dp_last_s']:.3f}s; DP work inside the step {1000 * r['dp_work_s']:.1f} ms = "
                f"{100 * r['dp_work_share']:.1f}% of a non-DP step)  (goal <= 1.05)",
                flush=True,
            )
    set_flush(True)
    if not args.skip_padding or args.accuracy_steps:
        train, evals, source = load_sst2(args.data_dir)
    if not args.skip_padding:
        lengths = train.tensors["attention_mask"].sum(1).float()
        print(
            f"[1p] data: {source}, {len(train)} training examples, {float(lengths.mean()):.1f} tokens on average (max-length {train.tensors['input_ids'].shape[1]})",
            flush=True,
        )
        for batch_size in (64, 512):
            batches = list(privacy.poisson_batches(len(train), batch_size / len(train), 200, torch.Generator().manual_seed(0)))
            before, after = padding_share(train, batches, 0), padding_share(train, batches, MICRO)
            print(
                f"[1p] padding share of computed tokens, Poisson batches of {batch_size}: one pass {100 * before:.1f}%, "
                f"length-sorted micro-batches of {MICRO} {100 * after:.1f}%",
                flush=True,
            )
        t = dp_throughput(train, 64, args.throughput_steps)
        print(
            f"[1p] DP-SGD (FFA-LoRA) examples/s, Poisson batches of 64 ({t['examples']} examples each way): one pass {t['one_pass']:.1f}, "
            f"micro-batches of {MICRO} {t['micro']:.1f}: x{t['micro'] / t['one_pass']:.2f}",
            flush=True,
        )
    if args.accuracy_steps:
        a = flush_accuracy(train, evals, args.accuracy_steps)
        print(
            f"[1a] DP FFA-LoRA, {args.accuracy_steps} steps of 64 (sigma {a['sigma']:.3f}), validation accuracy (loss): "
            f"initial {100 * a['initial'][1]:.2f}% ({a['initial'][0]:.4f}); denormals kept {100 * a['off'][1]:.2f}% ({a['off'][0]:.4f}), "
            f"flushed {100 * a['on'][1]:.2f}% ({a['on'][0]:.4f}); largest parameter difference {a['max_param_diff']:.3g}; "
            f"training {a['seconds_off']:.1f}s kept / {a['seconds_on']:.1f}s flushed",
            flush=True,
        )
    u = upload_ratio()
    print(
        f"[3] upload bytes per client per round, FFA-LoRA / LoRA (head frozen): {u['ffa_bytes']} / {u['lora_bytes']} = {u['ratio']:.4f}  (goal 0.5)", flush=True
    )
    for name, train_a in (("LoRA", True), ("FFA-LoRA", False)):
        n, secs = secure_noise_seconds(train_a)
        print(f"[1'] deployment DP noise (secure generator), {name} ({n} trainable values): {1000 * secs:.1f} ms per step", flush=True)
    chacha, kernel = secure_bytes_ratio()
    print(
        f"[1'] 2.4 MB of secure random bytes: ChaCha20 keyed from os.urandom {1000 * chacha:.1f} ms, os.urandom {1000 * kernel:.1f} ms (x{kernel / chacha:.2f})",
        flush=True,
    )
    if not args.skip_simulation:
        s = simulation_ratio(args.data_dir, args.rounds, args.steps)
        print(
            f"[2] simulation client round wall / training time: {s['ratio_later_rounds']:.3f} median over {s['client_rounds']} client-rounds after round 1 "
            f"(round 1, building the node: {s['ratio_round1']:.2f})  (goal <= 1.10)",
            flush=True,
        )
    if not args.skip_deployment:
        d = deployment_ratio(args.data_dir, args.steps)
        print(
            f"[2'] deployment, fresh process per round, token cache on disk: wall / training = {d['ratio_with_imports']:.2f} "
            f"({d['ratio_after_imports']:.2f} after Python imports; first process, tokenising: {d['ratio_first_process']:.2f}; training {d['train_s']:.2f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
