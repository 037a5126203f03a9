"""Where the model runs and in what precision: device choice, bf16 autocast
with float32 adapters, bitsandbytes quantisation, releasing GPU memory.

Every function here also runs on the CPU (the tests run there); CUDA-only
paths are the bitsandbytes loading and the CUDA memory calls.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging

import torch
from torch import nn

from .config import ComputeConfig, ConfigError, NodeConfigError

log = logging.getLogger("fedlora")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(spec: str, *, key: str = "device", node: bool = False) -> torch.device:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``mps``, ``cuda`` or ``cuda:N``,
    checked to exist here. ``node``: the spec is the node's own setting (its errors name node config)."""
    error = NodeConfigError if node else ConfigError
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise error(key, spec, "this machine has no MPS device")
        return torch.device("mps")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise error(key, spec, "must be auto, cpu, mps, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise error(key, spec, "CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if index and int(index) >= torch.cuda.device_count():
        raise error(key, spec, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(spec if index else "cuda")


def node_device(compute: ComputeConfig, node_device_spec: str) -> torch.device:
    """The node's own ``device`` (node config) if set, else the run's request."""
    if node_device_spec:
        return resolve_device(node_device_spec, node=True)
    return resolve_device(compute.device)


@functools.cache
def supports_bf16(device: torch.device) -> bool:
    """Whether autocast to bfloat16 runs on ``device``: CUDA by its capability,
    otherwise by trying a small matmul under autocast."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            x = torch.ones(2, 2, device=device)
            return (x @ x).dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


def check_precision(compute: ComputeConfig, device: torch.device) -> None:
    if compute.precision == "bf16" and not supports_bf16(device):
        raise ConfigError("precision", "bf16", f'device {device} cannot compute in bfloat16; use precision = "fp32"')
    if compute.quantization != "none" and device.type != "cuda":
        raise ConfigError("quantization", compute.quantization, f"bitsandbytes quantisation needs a CUDA device, this node runs on {device}")


def autocast(compute: ComputeConfig, device: torch.device):
    """The forward pass's precision context: bf16 autocast, or nothing."""
    if compute.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _fp32_forward(module: nn.Module):
    forward = module.forward

    @functools.wraps(forward)
    def run_in_fp32(*args, **kwargs):
        # Outside autocast, in float32: the activations and output gradients Opacus
        # multiplies into per-sample gradients are then float32 too.
        device_type = next(module.parameters()).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            return forward(*args, **kwargs)

    return run_in_fp32


def keep_trainable_fp32(model: nn.Module) -> int:
    """Make every module that owns a trainable parameter (LoRA A and B, a
    trained head) run in float32 outside autocast; return how many. Their
    parameters are float32 already; without this, autocast would compute them
    in bfloat16 and Opacus' per-sample gradients, clipping and noise with them."""
    count = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and any(p.requires_grad for p in own) and not getattr(module, "_fedlora_fp32", False):
            for p in own:
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
            module.forward = _fp32_forward(module)
            module._fedlora_fp32 = True
            count += 1
    return count


def quantization_kwargs(compute: ComputeConfig, device: torch.device | None) -> dict:
    """``from_pretrained`` arguments for a bitsandbytes base (empty for ``none``)."""
    if compute.quantization == "none":
        return {}
    if device is None or device.type != "cuda":
        raise ConfigError("quantization", compute.quantization, f"bitsandbytes quantisation needs a CUDA device, not {device or 'the CPU'}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ConfigError("quantization", compute.quantization, "needs bitsandbytes: pip install 'fedlora[quantization]'") from e
    if compute.quantization == "4bit":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": cfg, "device_map": {"": device.index or 0}}


def release() -> None:
    """Return the memory of models no longer referenced (a previous run's) to
    the system, GPU memory included: call it after dropping them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
