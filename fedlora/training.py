"""The local training and evaluation loops: plain torch, no Flower."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig
from .data import Encoded

log = logging.getLogger("fedlora")


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken
    loss: float  # mean training loss over the steps
    seconds: float


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


def train(
    model: nn.Module,
    data: Encoded,
    batches: Iterable[list[int]],
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """One pass over ``batches`` (index lists into ``data``): forward, backward, step."""
    model.train()
    start, losses, steps = time.perf_counter(), [], 0
    report_every = max(1, total_steps // 4)
    for i, idx in enumerate(batches, start=1):
        if len(idx) > 0:
            out = model(**data.batch(idx))
            out.loss.backward()
            losses.append(float(out.loss.detach()))
        elif hasattr(optimizer, "noise_multiplier"):
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
    return TrainResult(steps, sum(losses) / max(1, len(losses)), time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over ``data``."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, len(data)
    for start in range(0, n, batch_size):
        batch = data.batch(list(range(start, min(n, start + batch_size))))
        out = model(**batch)
        total_loss += float(out.loss) * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return total_loss / max(1, n), correct / max(1, n)
