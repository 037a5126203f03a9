"""The local training and evaluation loops: plain torch, no Flower."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data import PROMPT_LENGTH, STOP_IDS, Encoded

log = logging.getLogger("fedlora")


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken (one per logical batch)
    loss: float  # mean training loss over the steps
    seconds: float
    examples: int = 0  # examples forwarded (the sum of the batch sizes; under DP, Poisson's: private, not for release)


def round_learning_rate(cfg: TrainConfig, server_round: int, total_rounds: int) -> float:
    """The learning rate of round ``server_round`` (1-based) of ``total_rounds``: never above ``learning-rate``."""
    if cfg.lr_schedule == "cosine":
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (min(server_round, total_rounds) - 1) / max(1, total_rounds)))
    return cfg.learning_rate


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    params, lr = list(params), cfg.learning_rate if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


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


def device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return batch if device.type == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


Precision = Callable[[], contextlib.AbstractContextManager] | None  # a fresh autocast context per forward pass (devices.autocast)


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: (summed next-token NLL over each example's response tokens,
    their count), per example. ``labels`` is -100 outside the response."""
    targets = labels[:, 1:]
    mask = targets != -100
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return (nll * mask).sum(1), mask.sum(1)


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean loss over the batch's examples. Causal LM: each example's loss
    is the mean over its own response tokens. (Transformers' loss averages
    over all the batch's tokens, so one example's gradient would depend on the
    others' lengths: no longer a per-sample gradient, as DP-SGD needs.)"""
    if batch["labels"].dim() == 1:
        return model(**batch).loss
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    total, count = response_nll(out.logits, batch["labels"])
    return (total / count.clamp(min=1)).mean()


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
    precision: Precision = None,
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
    hook on it). 0 = the whole batch in one pass.

    Batches go to the model's device; ``precision`` (``devices.autocast``)
    wraps each forward pass."""
    flush_denormals(model)
    device = device_of(model)
    amp = precision or contextlib.nullcontext
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
                with amp():
                    loss = forward_loss(model, to_device(data.batch(part), device))
                if dp:
                    # Opacus' per-sample gradients do not depend on the micro-batch:
                    # with loss_reduction="mean" it multiplies the backprops by the
                    # micro-batch's size. The 1/expected-batch-size comes at the step.
                    loss.backward()
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
                    (loss * (len(part) / n)).backward()
                loss_sum += float(loss.detach()) * len(part)
            losses.append(loss_sum / n)
            examples += n
        elif dp:
            # An empty Poisson batch under DP-SGD is still a step: noise only.
            # Skipping it would reveal that no example was drawn, which the
            # accountant does not cover. (BERT cannot run a batch of 0.)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        else:
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if progress and (i % report_every == 0 or i == total_steps):
            progress(i, total_steps, sum(losses[-report_every:]) / max(1, len(losses[-report_every:])))
    return TrainResult(steps, sum(losses) / max(1, len(losses)), time.perf_counter() - start, examples)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Encoded, batch_size: int, *, precision: Precision = None, generate: bool = False, max_new_tokens: int = 8
) -> dict[str, float]:
    """Metrics of ``model`` on ``data``. Classification: mean cross-entropy
    ``loss`` and ``accuracy``. Causal LM: ``loss`` (mean NLL per response
    token) and ``perplexity``, and with ``generate`` the ``exact_match`` share
    of greedy answers (also as ``accuracy``). Batches are taken in order of
    length, so each is padded little: the totals do not depend on the order
    (up to float rounding)."""
    flush_denormals(model)
    was_training = model.training
    model.eval()
    device, amp = device_of(model), precision or contextlib.nullcontext
    n = len(data)
    order = torch.argsort(data.tensors["attention_mask"].sum(1), descending=True, stable=True)
    total_loss, correct, tokens = 0.0, 0, 0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = to_device(data.batch(idx), device)
        with amp():
            if data.causal:
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
                nll, count = response_nll(out.logits, batch["labels"])
                total_loss += float(nll.sum())
                tokens += int(count.sum())
            else:
                out = model(**batch)
                total_loss += float(out.loss) * len(batch["labels"])
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    metrics: dict[str, Any] = {}
    if data.causal:
        loss = total_loss / max(1, tokens)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        if generate:
            metrics["exact_match"] = metrics["accuracy"] = exact_match(model, data, batch_size, max_new_tokens, amp)
    else:
        metrics = {"loss": total_loss / max(1, n), "accuracy": correct / max(1, n)}
    model.train(was_training)
    return metrics


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


@torch.no_grad()
def exact_match(model: nn.Module, data: Encoded, batch_size: int, max_new_tokens: int, amp=contextlib.nullcontext) -> float:
    """The share of examples whose greedy answer, up to its first stop token,
    equals the reference response's tokens up to theirs (the response as
    tokenised for training: same context, same tokenisation). A reference
    longer than ``max_new_tokens`` cannot match (warned)."""
    device, n = device_of(model), len(data)
    stops = set(data.meta[STOP_IDS].tolist()) if STOP_IDS in data.meta else set()
    pad = int(getattr(getattr(model, "config", None), "pad_token_id", None) or 0)
    lengths = data.tensors[PROMPT_LENGTH]
    order = torch.argsort(lengths, descending=True, stable=True)
    correct, too_long = 0, 0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size].tolist()
        width = int(lengths[idx].max())
        # Left-padded prompts: generation continues every row from its last prompt token.
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        refs = []
        for row, i in enumerate(idx):
            p = int(lengths[i])
            ids[row, width - p :] = data.tensors["input_ids"][i, :p]
            mask[row, width - p :] = 1
            labels = data.tensors["labels"][i]
            refs.append(_until_stop(labels[labels != -100].tolist(), stops))
        with amp():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(stops) or None,
            )
        for row, ref in enumerate(refs):
            too_long += len(ref) > max_new_tokens
            correct += _until_stop(out[row, width:].tolist(), stops) == ref
    if too_long:
        log.warning("%d of %d reference answers are longer than eval.max-new-tokens = %d tokens: they cannot match", too_long, n, max_new_tokens)
    return correct / max(1, n)
