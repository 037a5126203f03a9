"""What one DP-SGD step computes that the same plain step does not (issue 13, item 1).

    python benchmarks/dp_ops.py [--strategy lora|ffa-lora] [--batch-size 16] [--seq 64] [--top 20] [--timed-steps 7]

Profiles one step of each (MiniLM with the strategy's adapters, the same weights and batch,
denormals flushed as training does on CPU) with torch.profiler, groups the operators by name
and input shapes, and prints those whose call count differs: the extra calls per step and
their self CPU time under the profiler. The counts are exact and machine-independent; the
milliseconds are inflated by the profiler (small operators most) and show only where the time
goes. Then unprofiled step times, interleaved from the same weights: plain, and DP with no
noise (hooks and clipping only; with fedlora's output-tensor hooks, and with Opacus' own full
module backward hooks), with seeded noise (simulations) and with the secure noise of
deployments, each with its ratio to plain.

What it showed on 2 CPUs (docs/BENCHMARKS.md): the overhead is Opacus' per-sample machinery,
a fixed cost per hooked module and step: the autograd nodes of its full backward hooks and the
Python hook code they run, the per-sample gradient, the zero-filled buffer it is copied into,
its norm, the clip-weighted sum, and a rescaling of the module's output gradient for
``loss_reduction="mean"``. fedlora's hooks (``privacy.wrap_model``) have since dropped the
autograd nodes, the buffer and, for Linear layers, the rescaling; the timed steps set them side
by side with Opacus' ways, and report the time spent inside the hooks and inside the
optimizer's clipping and noise, measured within each step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

sys.path.insert(0, os.path.dirname(__file__))

from speed import _batch, _trainable, timed_into  # noqa: E402  (speed.py's synthetic batch, the same [1] times)

from fedlora import privacy, training  # noqa: E402
from fedlora.config import parse_run_config  # noqa: E402
from fedlora.model import build_model  # noqa: E402


def _wrap(model, hooks: str, timer: list[float]):
    """``privacy.wrap_model``. ``"output-rescaled"``: its output-tensor hooks with Opacus'
    own path for Linear layers (the whole output gradient multiplied by the batch size, the
    per-sample gradient copied into a zero-filled buffer) around ``privacy.linear_grad_sample``;
    ``"output-einsum"``: that, with Opacus' own Linear sampler (one einsum). The seconds spent
    in the Linear sampler are added to ``timer[0]`` (output hooks only), those in the
    per-sample hooks, forward and backward, to ``timer[1]``."""
    from opacus import GradSampleModule
    from opacus.grad_sample.linear import compute_linear_grad_sample

    class Timed:  # mixed in first: times the hooks of the class after it
        def capture_activations_hook(self, *args, **kwargs):
            return timed_into(super().capture_activations_hook, timer, 1)(*args, **kwargs)

        def capture_backprops_hook(self, *args, **kwargs):
            return timed_into(super().capture_backprops_hook, timer, 1)(*args, **kwargs)

    model.train()
    if hooks == "module":
        return type("TimedModule", (Timed, GradSampleModule), {})(model, batch_first=True, loss_reduction="mean")
    base = privacy._output_hooks_class()
    linear = compute_linear_grad_sample if hooks == "output-einsum" else privacy.linear_grad_sample
    # "output": fedlora's own tables, each sampler timed; otherwise no short path for Linear.
    scaling = {t: timed_into(f, timer, 0) for t, f in base.SCALING_SAMPLERS.items()} if hooks == "output" else {}
    samplers = {**base.GRAD_SAMPLERS, torch.nn.Linear: scaling.get(torch.nn.Linear) or timed_into(linear, timer, 0)}
    cls = type("TimedLinear", (Timed, base), {"GRAD_SAMPLERS": samplers, "SCALING_SAMPLERS": scaling})
    return cls(model, batch_first=True, loss_reduction="mean")


def _ops(model, enc, idx, opt) -> dict[tuple[str, str], tuple[int, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        training.train(model, enc, [idx], opt, 1)
    return {(e.key, str(e.input_shapes)): (e.count, e.self_cpu_time_total / 1000) for e in p.key_averages(group_by_input_shape=True)}


def extra_ops(strategy: str, batch_size: int, seq: int, timed_steps: int = 7) -> dict:
    """The operators a DP step calls more (or fewer) times than a plain step, and the median
    step time of a plain step and of three DP steps: Opacus' hooks and clipping with no noise,
    plus noise from a seeded generator (simulations), plus noise from the secure generator
    (deployments). All four start from the same weights and time the same batch, interleaved."""
    training.set_flush_denormal(True)
    run = parse_run_config({"strategy": strategy})
    train_a = strategy == "lora"
    enc, idx = _batch(batch_size, seq), list(range(batch_size))
    plain = build_model(run, 2, train_lora_a=train_a)
    sides = {"plain": (plain, training.make_optimizer(_trainable(plain), run.train))}
    hooked, timers = 0, {}
    for name, noise, generator, hooks in (
        ("dp, no noise", 0.0, None, "output"),
        ("dp, no noise, Opacus' rescaling and buffers", 0.0, None, "output-rescaled"),
        ("dp, no noise, Opacus' Linear einsum", 0.0, None, "output-einsum"),
        ("dp, no noise, Opacus' module hooks", 0.0, None, "module"),
        ("dp, seeded noise", 1.0, torch.Generator().manual_seed(0), "output"),
        ("dp, secure noise", 1.0, None, "output"),
    ):
        private = build_model(run, 2, train_lora_a=train_a)
        private.load_state_dict(plain.state_dict())
        trainable = _trainable(private)
        hooked = len(trainable)
        ledger = privacy.PrivacyLedger(3.0, 1e-5, noise_multiplier=noise, sample_rate=0.01, planned_steps=10**6)
        opt = privacy.dp_optimizer(training.make_optimizer(trainable, run.train), ledger, 1.0, batch_size, generator)
        timers[name] = [0.0, 0.0, 0.0]
        sides[name] = (_wrap(private, hooks, timers[name]), opt)
        opt.pre_step = timed_into(opt.pre_step, timers[name], 2)  # clipping, noise
    for m, o in sides.values():
        training.train(m, enc, [idx], o, 1)  # warm-up
    ops = {k: _ops(sides[k][0], enc, idx, sides[k][1]) for k in ("plain", "dp, no noise")}
    rows = []
    for key in ops["plain"].keys() | ops["dp, no noise"].keys():
        c0, t0 = ops["plain"].get(key, (0, 0.0))
        c1, t1 = ops["dp, no noise"].get(key, (0, 0.0))
        if c1 != c0:
            rows.append({"op": key[0], "shapes": key[1], "extra_calls": c1 - c0, "extra_ms": t1 - t0})
    rows.sort(key=lambda r: -r["extra_ms"])
    times = {k: [] for k in sides}
    for t in timers.values():
        t[:] = [0.0] * len(t)  # from here: the timed steps only
    keys = list(sides)
    for i in range(timed_steps):  # interleaved, so machine noise hits all alike
        # Each step starts the round at the next side: where a side runs in the round
        # changes its time (one run here timed the side right after the plain step slower).
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            m, o = sides[k]
            times[k].append(training.train(m, enc, [idx], o, 1).seconds)
    # Each round's ratio to that round's plain step: the VM's slow drifts cancel.
    paired = {k: statistics.median(t / p for t, p in zip(v, times["plain"], strict=True)) for k, v in times.items()}
    for k, (m, _) in sides.items():
        if k != "plain":
            m._close()
    return {
        "rows": rows,
        "hooked_tensors": hooked,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "paired_ratio": paired,
        # Seconds a step inside the per-sample hooks and inside the optimizer's clipping and noise.
        "hook_seconds": {k: t[1] / timed_steps for k, t in timers.items()},
        "clip_noise_seconds": {k: t[2] / timed_steps for k, t in timers.items()},
        "linear_sampler_seconds": {k: t[0] / timed_steps for k, t in timers.items() if k in ("dp, no noise", "dp, no noise, Opacus' Linear einsum")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", choices=("lora", "ffa-lora"), default="lora")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--top", type=int, default=20, help="rows to print, largest extra time first")
    ap.add_argument("--timed-steps", type=int, default=7, help="interleaved unprofiled steps per side (the median is printed)")
    args = ap.parse_args()
    r = extra_ops(args.strategy, args.batch_size, args.seq, args.timed_steps)
    print(f"{args.strategy}, MiniLM, batch {args.batch_size} x {args.seq} tokens: {r['hooked_tensors']} trainable tensors under Opacus' hooks")
    print(f"{'extra calls':>11}  {'extra ms (profiled)':>19}  operator  input shapes")
    for row in r["rows"][: args.top]:
        print(f"{row['extra_calls']:>+11d}  {row['extra_ms']:>19.2f}  {row['op']}  {row['shapes'][:100]}")
    total = sum(row["extra_ms"] for row in r["rows"])
    print(f"all {len(r['rows'])} differing rows: {total:.1f} ms extra under the profiler")
    sec = r["seconds"]
    print(f"unprofiled steps, median of {args.timed_steps} interleaved (batch {args.batch_size} x {args.seq}):")
    print(f"  {'':<44} {'median':>8}   {'/ plain':>7}  {'paired':>6}  {'in hooks':>8}  {'clip+noise':>10}")
    for k, v in sec.items():
        hooks, clip = r["hook_seconds"].get(k), r["clip_noise_seconds"].get(k)
        dp = f"  {1000 * hooks:6.1f}ms  {1000 * clip:8.1f}ms" if hooks is not None else ""
        print(f"  {k:<44} {1000 * v:6.1f}ms   {v / sec['plain']:7.3f}  {r['paired_ratio'][k]:6.3f}{dp}")
    print("(paired: median over the rounds of each DP step's time / that round's plain step; in hooks: the per-sample")
    print(" hooks, forward and backward; clip+noise: the optimizer's clipping and noise. Both ms per step, timed inside it)")
    lin = r["linear_sampler_seconds"]
    ours, einsum = lin["dp, no noise"], lin["dp, no noise, Opacus' Linear einsum"]
    print(
        f"time inside the Linear per-sample gradient samplers, mean ms per step over the timed steps: "
        f"fedlora's bmm {1000 * ours:.2f}, Opacus' einsum {1000 * einsum:.2f} (x{einsum / ours:.2f})"
    )


if __name__ == "__main__":
    main()
