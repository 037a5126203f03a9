"""What crosses the network: the one place that decides it and counts it.

A payload is exactly the model's trainable tensors (its ``requires_grad``
set, fixed per method by ``model.set_trainable``): for LoRA the A and B
factors (and the head if it trains), for FFA-LoRA only B (and the head).
Frozen tensors that are not pretrained weights (FFA-LoRA's A, a frozen head)
never travel; every node derives them from the run seed and proves it holds
the same ones with ``fingerprint``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from .model import is_head, is_lora_a, is_lora_b

OPACUS_PREFIX = "_module."


def _clean(name: str) -> str:
    # Opacus' GradSampleModule prefixes parameter names; payload keys never carry it.
    while name.startswith(OPACUS_PREFIX):
        name = name[len(OPACUS_PREFIX):]
    return name


def payload_names(model: nn.Module) -> list[str]:
    return [_clean(n) for n, p in model.named_parameters() if p.requires_grad]


def to_arrays(model: nn.Module) -> ArrayRecord:
    """The payload a node sends: every trainable tensor, as float32 numpy."""
    return ArrayRecord(
        {_clean(n): Array(p.detach().cpu().numpy().copy()) for n, p in model.named_parameters() if p.requires_grad}
    )


class PayloadError(ValueError):
    """An incoming payload does not match this node's trainable set."""


@torch.no_grad()
def load_arrays(model: nn.Module, arrays: ArrayRecord, *, sender: str = "server") -> None:
    """Copy a payload into the model; the keys must be exactly the trainable set."""
    params = {_clean(n): p for n, p in model.named_parameters() if p.requires_grad}
    keys = set(arrays.keys())
    if keys != set(params):
        missing, extra = sorted(set(params) - keys), sorted(keys - set(params))
        raise PayloadError(f"payload from {sender} does not match the trainable tensors: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, p in params.items():
        value = arrays[key].numpy()
        if tuple(value.shape) != tuple(p.shape):
            raise PayloadError(f"payload from {sender}: {key} has shape {value.shape}, expected {tuple(p.shape)}")
        p.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def nbytes(arrays: ArrayRecord) -> int:
    """Serialised bytes of a payload's arrays: each tensor's data plus its
    small .npy header, without Flower's message framing."""
    return int(sum(len(a.data) for a in arrays.values()))


def shared_frozen_names(model: nn.Module) -> list[str]:
    """Frozen tensors that every node must hold identically but that do not
    travel: LoRA A when frozen (FFA-LoRA), and the head when frozen."""
    return [
        _clean(n)
        for n, p in model.named_parameters()
        if not p.requires_grad and (is_lora_a(n) or is_lora_b(n) or is_head(n))
    ]


_SAMPLE = 4096  # values per pretrained tensor that enter the fingerprint


@torch.no_grad()
def _base_digest(model: nn.Module) -> str:
    """The pretrained weights, sampled (every tensor's name and shape, and up to
    4096 evenly strided values): a different checkpoint of the same
    architecture changes it, at a cost independent of model size. Cached on the
    model, whose pretrained weights never change."""
    cached = model.__dict__.get("_fedlora_base_digest")
    if cached:
        return cached
    h = hashlib.sha256()
    shared = set(shared_frozen_names(model)) | set(payload_names(model))
    for name, p in sorted((_clean(n), p) for n, p in model.named_parameters()):
        if name in shared or ".original_module." in name:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(flat[::step][:_SAMPLE].cpu().to(torch.float32).numpy().tobytes())
    model.__dict__["_fedlora_base_digest"] = digest = h.hexdigest()
    return digest


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the shared frozen tensors (names, shapes, float32 bytes) and
    a sample of the pretrained weights."""
    h = hashlib.sha256(_base_digest(model).encode())
    params = dict((_clean(n), p) for n, p in model.named_parameters())
    for name in sorted(shared_frozen_names(model)):
        t = params[name].detach().cpu().to(torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
