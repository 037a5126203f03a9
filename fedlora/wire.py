"""What crosses the network: the one place that decides it and counts it.

A payload is exactly the model's trainable tensors (its ``requires_grad``
set, fixed per method by ``model.set_trainable``): for LoRA the A and B
factors (and the head if it trains), for FFA-LoRA only B (and the head).
Frozen tensors that are not pretrained weights (FFA-LoRA's A, a frozen head)
never travel; every node derives them from the run seed and proves it holds
the same ones with ``fingerprint``.

Methods that move other sets (FedSA-LoRA keeps B on the node, FedSVD sends a
frozen A, FLoRA restarts the factors) describe them with an ``Exchange``; the
server's global state is then ``global_names`` plus, for methods that merge
updates into the frozen base weights, base-delta entries (``add_base_delta``),
kept low-rank or dense, whichever is fewer bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from .model import init_shared, is_head, is_lora_a, is_lora_b

OPACUS_PREFIX = "_module."

# Config keys the server sends with every train/evaluate message, besides the arrays.
STRATEGY_KEY = "strategy"  # the method: which Exchange the node uses
FINGERPRINT_KEY = "shared-fingerprint"  # the run's shared frozen tensors (see ``fingerprint``)


def _clean(name: str) -> str:
    # Opacus' GradSampleModule prefixes parameter names; payload keys never carry it.
    while name.startswith(OPACUS_PREFIX):
        name = name[len(OPACUS_PREFIX) :]
    return name


def payload_names(model: nn.Module) -> list[str]:
    return [_clean(n) for n, p in model.named_parameters() if p.requires_grad]


def to_arrays(model: nn.Module, names: Iterable[str] | None = None) -> ArrayRecord:
    """The payload a node sends: every trainable tensor (or the tensors ``names``), as float32 numpy."""
    keep = set(names) if names is not None else None
    return ArrayRecord(
        {_clean(n): Array(p.detach().cpu().numpy().copy()) for n, p in model.named_parameters() if (p.requires_grad if keep is None else _clean(n) in keep)}
    )


class PayloadError(ValueError):
    """An incoming payload does not match this node's trainable set."""


@torch.no_grad()
def load_arrays(model: nn.Module, arrays: ArrayRecord, *, sender: str = "server", names: Iterable[str] | None = None) -> None:
    """Copy a payload into the model; the keys must be exactly the trainable set (or ``names``)."""
    keep = set(names) if names is not None else None
    params = {_clean(n): p for n, p in model.named_parameters() if (p.requires_grad if keep is None else _clean(n) in keep)}
    keys = set(arrays.keys())
    if keys != set(params):
        missing, extra = sorted(set(params) - keys), sorted(keys - set(params))
        raise PayloadError(f"payload from {sender} does not match the trainable tensors: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, p in params.items():
        value = arrays[key].numpy()
        if tuple(value.shape) != tuple(p.shape):
            raise PayloadError(f"payload from {sender}: {key} has shape {value.shape}, expected {tuple(p.shape)}")
        p.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


# -- the wire's number format ------------------------------------------------------

BF16 = "bfloat16"  # Flower's Array.dtype of a bfloat16 payload (numpy has no bfloat16: the bits travel as uint16)
_FP16_MAX = float(np.finfo(np.float16).max)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _encode_array(key: str, value: np.ndarray, dtype: str) -> Array:
    x = np.asarray(value, dtype=np.float32)
    if dtype == "float32":
        return Array(np.ascontiguousarray(x))
    if dtype == "float16":
        if np.isfinite(x).all() and np.abs(x).max(initial=0.0) > _FP16_MAX:
            raise PayloadError(f"{key} has values beyond float16's range (±{_FP16_MAX:g}): use wire.dtype = bfloat16 or float32")
        return Array(x.astype(np.float16))
    if dtype == BF16:
        shell = Array(_bf16_bits(x))  # the uint16 bits, serialised as .npy
        return Array(dtype=BF16, shape=tuple(x.shape), stype=shell.stype, data=shell.data)
    raise ValueError(f"unknown wire dtype {dtype!r}")


def encode(arrays: ArrayRecord, dtype: str) -> ArrayRecord:
    """A payload as it travels: every tensor rounded to ``dtype`` (``wire.dtype``)."""
    return ArrayRecord({k: _encode_array(k, decode_array(arrays[k], k), dtype) for k in arrays.keys()})


def decode_array(a: Array, key: str = "?", sender: str = "server") -> np.ndarray:
    """A received tensor as float32 numpy, whatever number format it travelled in."""
    if a.dtype == BF16:
        bits = a.numpy()
        if bits.dtype != np.uint16:
            raise PayloadError(f"payload from {sender}: {key} claims bfloat16 but holds {bits.dtype}")
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(bits.shape)
    value = a.numpy()
    if value.dtype not in (np.float32, np.float16, np.float64):
        raise PayloadError(f"payload from {sender}: {key} has dtype {value.dtype}; expected float32, float16 or bfloat16")
    return value.astype(np.float32, copy=False)


def decode(arrays: ArrayRecord, sender: str = "server") -> ArrayRecord:
    """A received payload with every tensor as float32 (what the node and the server compute with)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(decode_array(arrays[k], k, sender))) for k in arrays.keys()})


def nbytes(arrays: ArrayRecord) -> int:
    """Serialised bytes of a payload's arrays: each tensor's data plus its
    small .npy header, without Flower's message framing."""
    return int(sum(len(a.data) for a in arrays.values()))


def shared_frozen_names(model: nn.Module, exchange: Exchange | None = None) -> list[str]:
    """Frozen tensors that every node must hold identically but that do not
    travel: LoRA A when frozen (FFA-LoRA; not FedSVD, whose server sends A),
    and the head when frozen."""
    a_sent = exchange is not None and exchange.a_down
    return [_clean(n) for n, p in model.named_parameters() if not p.requires_grad and ((is_lora_a(n) and not a_sent) or is_lora_b(n) or is_head(n))]


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
    for name, p in sorted((_clean(n), p) for n, p in model.named_parameters()):
        if is_lora_a(name) or is_lora_b(name) or is_head(name) or ".original_module." in name:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(flat[::step][:_SAMPLE].cpu().to(torch.float32).numpy().tobytes())
    model.__dict__["_fedlora_base_digest"] = digest = h.hexdigest()
    return digest


@torch.no_grad()
def fingerprint(model: nn.Module, exchange: Exchange | None = None) -> str:
    """SHA-256 over the shared frozen tensors (names, shapes, float32 bytes) and
    a sample of the pretrained weights."""
    h = hashlib.sha256(_base_digest(model).encode())
    params = dict((_clean(n), p) for n, p in model.named_parameters())
    for name in sorted(shared_frozen_names(model, exchange)):
        t = params[name].detach().cpu().to(torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# -- what each method moves -------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """Which LoRA factors a method trains and which cross the network, each way
    (the head travels both ways iff it trains). The defaults are vanilla LoRA."""

    train_a: bool = True  # clients train A
    a_down: bool = True  # the server sends A (FedSVD: frozen on clients, yet sent)
    b_down: bool = True  # the server sends B (not FLoRA, which restarts it; not FedSA, where B is personal)
    b_up: bool = True  # clients send B back (FedSA: False, B stays on the node)
    restart: bool = False  # A and B re-drawn from the seed before each round (FLoRA)
    base_delta: bool = False  # the server also sends a cumulative update of the frozen base weights

    @classmethod
    def of(cls, model: nn.Module) -> Exchange:
        """LoRA or FFA-LoRA, read from the model's trainable set."""
        a = any(p.requires_grad for n, p in model.named_parameters() if is_lora_a(n))
        return cls(train_a=a, a_down=a)


def _is_sent(name: str, trains: bool, a: bool, b: bool) -> bool:
    return (is_lora_a(name) and a) or (is_lora_b(name) and b) or (is_head(name) and trains)


def down_names(model: nn.Module, ex: Exchange) -> list[str]:
    """Tensors the server sends (besides base-delta entries)."""
    return [_clean(n) for n, p in model.named_parameters() if _is_sent(n, p.requires_grad, ex.a_down, ex.b_down)]


def up_names(model: nn.Module, ex: Exchange) -> list[str]:
    """Tensors a client sends back: what it trained, less a personal B."""
    return [_clean(n) for n, p in model.named_parameters() if p.requires_grad and not (is_lora_b(n) and not ex.b_up)]


def personal_names(model: nn.Module, ex: Exchange) -> list[str]:
    """Trained tensors that never leave the node (FedSA-LoRA's B)."""
    return [] if ex.b_up else [_clean(n) for n, p in model.named_parameters() if is_lora_b(n) and p.requires_grad]


def global_names(model: nn.Module, ex: Exchange) -> list[str]:
    """The server's adapter state: what it sends and what it receives."""
    return sorted(set(down_names(model, ex)) | set(up_names(model, ex)))


DELTA, DELTA_U, DELTA_V = ".fedlora_delta", ".fedlora_delta_u", ".fedlora_delta_v"


def is_delta(key: str) -> bool:
    return key.endswith((DELTA, DELTA_U, DELTA_V))


def lora_module(key: str) -> str:
    """The LoRA layer a factor's key belongs to."""
    return key.split(".lora_A.")[0].split(".lora_B.")[0]


def _f64(value) -> np.ndarray:
    return np.asarray(value.numpy() if isinstance(value, Array) else value, dtype=np.float64)


def base_delta(arrays: Mapping, module: str) -> np.ndarray | None:
    """A layer's cumulative base-weight update (d_out x d_in), or None; ``arrays``
    maps keys to flwr Arrays or numpy arrays."""
    if module + DELTA in arrays:
        return _f64(arrays[module + DELTA])
    if module + DELTA_U in arrays:
        return _f64(arrays[module + DELTA_U]) @ _f64(arrays[module + DELTA_V])
    return None


def add_base_delta(state: dict[str, np.ndarray], module: str, u: np.ndarray, v: np.ndarray) -> None:
    """Add u @ v to a layer's cumulative base update in ``state`` (in place).

    Kept as stacked factors (U: d_out x R, V: R x d_in) while R (d_out + d_in)
    < d_out d_in, i.e. while that is fewer bytes than the dense matrix; dense after."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    keep = np.any(u != 0, axis=0) & np.any(v != 0, axis=1)  # zero terms (e.g. rank padding) add nothing
    u, v = u[:, keep], v[keep]
    if module + DELTA_U in state:
        u = np.concatenate([state.pop(module + DELTA_U), u], axis=1)
        v = np.concatenate([state.pop(module + DELTA_V), v], axis=0)
    d_out, d_in = u.shape[0], v.shape[1]
    if module + DELTA in state or u.shape[1] * (d_out + d_in) >= d_out * d_in:
        dense = state.pop(module + DELTA, np.zeros((d_out, d_in)))
        state[module + DELTA] = (np.asarray(dense, np.float64) + u @ v).astype(np.float32)
    else:
        state[module + DELTA_U], state[module + DELTA_V] = u.astype(np.float32), v.astype(np.float32)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {_clean(n): m for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}


@torch.no_grad()
def set_base_delta(model: nn.Module, arrays: Mapping) -> None:
    """Frozen base weight of every LoRA layer := pretrained + its delta in
    ``arrays`` (pretrained where none). Absolute, so a node that missed rounds,
    or a process shared by nodes, always holds the run's current base."""
    _base_digest(model)  # the fingerprint samples the pretrained weights: before any change
    for name, layer in _lora_layers(model).items():
        weight = layer.base_layer.weight
        pretrained = layer.__dict__.setdefault("_fedlora_pretrained", weight.detach().clone())
        delta = base_delta(arrays, name)
        if delta is not None and getattr(layer, "fan_in_fan_out", False):
            delta = delta.T  # GPT-2's Conv1D stores its weight d_in x d_out; deltas are d_out x d_in (B A)
        weight.copy_(pretrained if delta is None else pretrained + torch.from_numpy(np.ascontiguousarray(delta)).to(pretrained))


def load_global(model: nn.Module, arrays: ArrayRecord, ex: Exchange, *, names: Iterable[str] | None = None, sender: str = "server") -> None:
    """Load an adapter state (``names``, default ``global_names``) and, for
    methods that merge into the base, the base delta it carries."""
    expected = set(global_names(model, ex) if names is None else names)
    load_arrays(model, ArrayRecord({k: arrays[k] for k in arrays.keys() if not is_delta(k)}), sender=sender, names=expected)
    if ex.base_delta:
        set_base_delta(model, {k: arrays[k] for k in arrays.keys() if is_delta(k)})
    elif any(is_delta(k) for k in arrays.keys()):
        raise PayloadError(f"payload from {sender} carries a base-weight update this method does not use")


def _fit_rank(model: nn.Module, arrays: ArrayRecord) -> ArrayRecord:
    """A node of a lower rank r_k takes the first r_k rows of each A and columns of
    each B (HetLoRA-style truncation)."""
    shapes = {_clean(n): tuple(p.shape) for n, p in model.named_parameters()}
    out = {}
    for key in arrays.keys():
        value, shape = arrays[key], shapes.get(key)
        if shape and tuple(value.shape) != shape and (is_lora_a(key) or is_lora_b(key)):
            value = Array(np.ascontiguousarray(value.numpy()[: shape[0], : shape[1]]))
        out[key] = value
    return ArrayRecord(out)


@torch.no_grad()
def load_down(model: nn.Module, arrays: ArrayRecord, ex: Exchange, seed: int, personal: ArrayRecord | None = None) -> None:
    """On a node, before a round: restart the factors (FLoRA), load what the
    server sent, and this node's personal tensors (zero before its first round)."""
    if ex.restart:  # a frozen head is re-drawn identically; a trained one comes in ``arrays``
        init_shared(model, seed)
    load_global(model, _fit_rank(model, arrays), ex, names=down_names(model, ex))
    if mine := personal_names(model, ex):
        if personal is None:
            params = dict((_clean(n), p) for n, p in model.named_parameters())
            for name in mine:
                params[name].zero_()
        else:
            load_arrays(model, personal, sender="this node's personal state", names=mine)
