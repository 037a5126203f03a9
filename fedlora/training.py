"""The local training and evaluation loops: plain torch, no Flower."""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig
from .data import Encoded

log = logging.getLogger("fedlora")


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken (one per logical batch)
    loss: float  # mean training loss over the steps
    seconds: float
    examples: int = 0  # examples forwarded (the sum of the batch sizes; under DP, Poisson's: private, not for release)


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)


def shuffled_batches(num_examples: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Fixed-size batches without replacement, reshuffled at each pass over the data."""
    batch_size = min(batch_size, num_examples)
    perm, pos = torch.randperm(num_examples, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > num_examples:
            perm, pos = torch.randperm(num_examples, generator=generator), 0
        yield perm[pos : pos + batch_size].tolist()
        pos += batch_size


def set_flush_denormal(on: bool) -> bool:
    """``torch.set_flush_denormal(on)`` on the calling thread and on every
    thread of torch's OpenMP pool; False if the CPU cannot (then nothing changes).

    The flush-to-zero / denormals-are-zero flags are per thread (x86 MXCSR):
    torch sets them on the calling thread only, and threads inherit them only
    when created. So torch's intra-op threads, started at its first parallel
    op, keep flushing or not as the thread that started them did then. With
    GNU OpenMP (torch's CPU builds on Linux), one parallel region sets them in
    each pool thread; elsewhere only the calling thread (and threads it starts
    later) is set."""
    if not torch.set_flush_denormal(on):
        return False
    threads = torch.get_num_threads()
    if threads > 1 and (gomp := _libgomp()) is not None:

        def in_each_thread(_data) -> None:
            torch.set_flush_denormal(on)

        gomp.GOMP_parallel(_GOMP_FN(in_each_thread), None, threads, 0)
    return True


_GOMP_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_GOMP: list = []  # cache: [the loaded libgomp] or [None]


def _libgomp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch runs its intra-op threads on, if loaded (Linux)."""
    if not _GOMP:
        lib = None
        try:
            if "parallel backend: OpenMP" in torch.__config__.parallel_info():
                with open("/proc/self/maps") as f:
                    paths = sorted({line.split()[-1] for line in f if "/libgomp" in line})
                if len(paths) == 1:
                    lib = ctypes.CDLL(paths[0])  # already loaded: the same instance torch uses
                    lib.GOMP_parallel.argtypes = [_GOMP_FN, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    lib.GOMP_parallel.restype = None
        except (OSError, AttributeError) as e:
            log.debug("cannot reach torch's OpenMP runtime (%s): flushing denormals on the calling thread only", e)
            lib = None
        _GOMP.append(lib)
    return _GOMP[0]


# Benchmarks switch this off to measure what flushing denormals changes.
FLUSH_DENORMALS = True


def flush_denormals(model: nn.Module) -> bool:
    """Flush denormal floats to zero when ``model`` is on the CPU; True if set.

    DP-SGD on CPU drifts into denormal (subnormal) floats, mostly in the
    backward pass, which x86 CPUs can compute on a slow microcode path (DP
    steps were seen to slow ~2x within a few dozen steps on Intel). Values
    below ~1e-38 are far below anything that matters at this model's scale.

    NOTE: this is process-global, not local to the model or this call: it stays
    on for everything the process computes afterwards on these threads (see
    ``set_flush_denormal``). It is set at the start of every train/evaluate
    since Flower may call them from different threads."""
    param = next(model.parameters(), None)
    if not FLUSH_DENORMALS or param is None or param.device.type != "cpu":
        return False
    return set_flush_denormal(True)


def micro_batches(data: Encoded, idx: Sequence[int] | torch.Tensor, size: int) -> list[list[int]]:
    """Split a logical batch into micro-batches of at most ``size`` examples,
    longest first (by token count), so that each one is padded only to its own
    longest (``Encoded.batch``). ``size`` 0, or a batch no larger than it: one
    micro-batch, in the given order."""
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    if size <= 0 or len(idx) <= size:
        return [idx.tolist()]
    lengths = data.tensors["attention_mask"][idx].sum(1)
    ordered = idx[torch.argsort(lengths, descending=True, stable=True)]
    return [chunk.tolist() for chunk in ordered.split(size)]


def _is_dp(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer, "noise_multiplier")  # Opacus' DPOptimizer (and subclasses)


def train(
    model: nn.Module,
    data: Encoded,
    batches: Iterable[Sequence[int]],
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    progress: Callable[[int, int, float], None] | None = None,
    *,
    micro_batch_size: int = 0,
) -> TrainResult:
    """One pass over ``batches`` (index lists into ``data``): forward, backward,
    one optimizer step per batch.

    ``micro_batch_size`` > 0 processes each (logical) batch in length-sorted
    micro-batches of at most that many examples (``micro_batches``), each
    padded only to its own longest; the gradients add up over them and the
    optimizer steps once per logical batch, so the result equals one pass
    (up to float rounding) and a logical batch may exceed memory. Under DP-SGD
    (an Opacus ``DPOptimizer``) each micro-batch's per-sample gradients are
    clipped and summed at once (Opacus' virtual steps, as in its
    ``BatchMemoryManager``); the noise is added and the step taken, once, after
    the last one, and only that step reaches the optimizer (and any accountant
    hook on it). 0 = the whole batch in one pass."""
    flush_denormals(model)
    model.train()
    dp = _is_dp(optimizer)
    optimizer.zero_grad(set_to_none=True)
    start, losses, steps, examples = time.perf_counter(), [], 0, 0
    report_every = max(1, total_steps // 4)
    for i, idx in enumerate(batches, start=1):
        n = len(idx)
        if n > 0:
            parts = micro_batches(data, idx, micro_batch_size)
            loss_sum = 0.0
            for j, part in enumerate(parts):
                out = model(**data.batch(part))
                if dp:
                    # Opacus' per-sample gradients do not depend on the micro-batch:
                    # with loss_reduction="mean" it multiplies the backprops by the
                    # micro-batch's size. The 1/expected-batch-size comes at the step.
                    out.loss.backward()
                    if j < len(parts) - 1:
                        # Clip this micro-batch's per-sample gradients and add them to
                        # the running sum (p.summed_grad); no noise, no step. Not leaving
                        # them stacked in p.grad_sample: Opacus would divide the mean by
                        # expected_batch_size * micro-batches and charge the accountant
                        # that many times the sample rate.
                        optimizer.signal_skip_step(do_skip=True)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                else:
                    # The mean over the logical batch: each micro-batch's mean, weighted.
                    (out.loss * (len(part) / n)).backward()
                loss_sum += float(out.loss.detach()) * len(part)
            losses.append(loss_sum / n)
            examples += n
        elif dp:
            # An empty Poisson batch under DP-SGD is still a step: noise only.
            # Skipping it would reveal that no example was drawn, which the
            # accountant does not cover. (BERT cannot run a batch of 0.)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if progress and (i % report_every == 0 or i == total_steps):
            progress(i, total_steps, sum(losses[-report_every:]) / max(1, len(losses[-report_every:])))
    return TrainResult(steps, sum(losses) / max(1, len(losses)), time.perf_counter() - start, examples)


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over ``data``. Batches are taken in
    order of length, so each is padded little: the totals do not depend on the
    order (up to float rounding)."""
    flush_denormals(model)
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, len(data)
    order = torch.argsort(data.tensors["attention_mask"].sum(1), descending=True, stable=True)
    for start in range(0, n, batch_size):
        batch = data.batch(order[start : start + batch_size])
        out = model(**batch)
        total_loss += float(out.loss) * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return total_loss / max(1, n), correct / max(1, n)
