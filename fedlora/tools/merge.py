"""``fedlora merge RUN_DIR OUT_DIR``: a complete run's global adapter merged
into its base model, saved as a plain transformers model.

Reads the run's ``config.json`` (task, model, label names), loads the base in
float32 with ``fedlora.model.load_base`` (the loader the run used, offline
copies and ``.gguf`` files included), applies ``adapter/`` with PEFT, adds
``adapter/base_delta.npz`` (FedEx-LoRA, FLoRA: the updates merged into the
frozen base during the run) to the base weights of the LoRA layers with
``wire.set_base_delta`` (as the server did), merges, and writes OUT_DIR with
``save_pretrained`` together with the tokenizer. OUT_DIR then loads with
``AutoModelForCausalLM.from_pretrained`` (``causal-lm``) or
``AutoModelForSequenceClassification.from_pretrained`` (``classification``,
label names in ``id2label``), without fedlora or peft.

The merged model is what the server evaluated in the run's last round (for a
run with a quantised base: its full-precision base, merged). Whatever DP
guarantee the run gives for the adapter covers the merged model too: it is a
function of the adapter and the public base.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import uuid
from typing import Any

from ..config import ConfigError
from ..run_folder import CHECKPOINT, DATA_DIR_VAR, RESULT

DTYPES = ("float32", "bfloat16", "float16")
ADAPTER = "adapter"
BASE_DELTA = "base_delta.npz"
INFO = "fedlora_merge.json"  # what was merged, next to the model (provenance; transformers ignores it)
PACKAGES = "site-packages"  # how config.json writes the installed packages' directory (run_folder.portable)


class MergeError(ValueError):
    """A run folder, output folder or setting that cannot be merged."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a complete run's folder (with config.json and adapter/)")
    p.add_argument("out_dir", help="where the merged model and its tokenizer go (new or empty, unless --force)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights (the merge itself runs in float32)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR (files of the same name are replaced)")
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"the data directory the run used, for paths config.json writes as {DATA_DIR_VAR}/... (default: $FEDLORA_DATA_DIR)",
    )
    p.add_argument("--base-model", default="", help="load the base from here instead of the run's `model` (the same checkpoint, moved)")


def main(args: argparse.Namespace) -> int:
    try:
        out = merge(args.run_dir, args.out_dir, dtype=args.dtype, force=args.force, data_dir=args.data_dir, base_model=args.base_model)
    except (MergeError, ConfigError) as e:
        print(f"fedlora merge: {e}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


# -- the run folder ------------------------------------------------------------------


def read_run(run_dir: str) -> dict[str, Any]:
    """The run's ``config.json``, checked to be a complete run with an adapter."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise MergeError(f"{run_dir}: no such run folder")
    if not os.path.isfile(config_path):
        raise MergeError(f"{run_dir} is not a run folder (no config.json)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise MergeError(f"{config_path}: cannot read it ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("resolved"), dict):
        raise MergeError(f"{config_path} has no resolved run config ('resolved'): not written by fedlora?")
    adapter = os.path.join(run_dir, ADAPTER)
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        hint = "the run is incomplete: an adapter is saved when the last round completes"
        if os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
            hint += "; finish it with resume=true (it has a checkpoint)"
        raise MergeError(f"{run_dir} has no {ADAPTER}/ with an adapter_config.json: {hint}")
    return config


def resolve_path(value: str, key: str, data_dir: str | None, config_path: str) -> str:
    """A path as config.json records it (``$FEDLORA_DATA_DIR/...``,
    ``site-packages/...``), made a path on this machine."""
    if value == DATA_DIR_VAR or value.startswith(DATA_DIR_VAR + "/"):
        root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_VAR[1:], "")
        if not root:
            raise MergeError(
                f"{config_path} records {key} = {value!r}, relative to the run's data directory: "
                f"set {DATA_DIR_VAR[1:]} (or --data-dir) to that directory on this machine"
            )
        return os.path.join(os.path.expanduser(root), value[len(DATA_DIR_VAR) :].lstrip("/"))
    if value.startswith(PACKAGES + "/"):
        path = os.path.join(sysconfig.get_paths()["purelib"], value[len(PACKAGES) + 1 :])
        if not os.path.exists(path):
            raise MergeError(f"{config_path} records {key} = {value!r}, an installed package's file, not found here ({path}): install it")
        return path
    return value


def run_settings(config: dict[str, Any], config_path: str, data_dir: str | None, base_model: str) -> dict[str, Any]:
    """What the merge needs from config.json: task, model, label names, strategy."""
    resolved = config["resolved"]
    task = resolved.get("task", "classification")  # a run that predates `task` was a classifier
    if task not in ("classification", "causal-lm"):
        raise MergeError(f"{config_path}: unknown task {task!r}")
    model = base_model or resolved.get("model")
    if not isinstance(model, str) or not model:
        raise MergeError(f"{config_path} records no model")
    model = resolve_path(model, "model", data_dir, config_path)
    labels = list((config.get("data") or {}).get("label-names") or [])
    if task == "classification" and len(labels) < 2:
        raise MergeError(f"{config_path} records no label names (data.label-names): cannot size the classifier head")
    pooling = resolved.get("pooling", "model")  # a run that predates `pooling` read the architecture's pooler
    if pooling == "mean":
        _refuse_pooling(config_path, "pooling = 'mean'")
    return {"task": task, "model": model, "labels": labels, "strategy": resolved.get("strategy", ""), "pooling": pooling}


def _refuse_pooling(config_path: str, what: str) -> None:
    # transformers would read the merged checkpoint with the architecture's own pooler, not the run's.
    raise MergeError(
        f"{config_path}: the run's classifier read the mean of the hidden states ({what}), which a transformers "
        "checkpoint cannot record; load the adapter with fedlora.model.build_model (same run config) and PeftModel "
        "instead, or train with pooling = 'model' to get a mergeable classifier"
    )


# -- the output folder ---------------------------------------------------------------


def check_out_dir(out_dir: str, run_dir: str, force: bool) -> None:
    out, run = os.path.realpath(out_dir), os.path.realpath(run_dir)
    if out == run or out == os.path.join(run, ADAPTER) or out.startswith(os.path.join(run, ADAPTER) + os.sep):
        raise MergeError(f"{out_dir}: the output folder must not be the run folder or its {ADAPTER}/")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise MergeError(f"{out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise MergeError(f"{out_dir} exists and is not empty: choose another folder, or --force to write into it")


def _is_weights(name: str) -> bool:
    """A weight file, shard or shard index that from_pretrained would read."""
    return name.startswith(("model", "pytorch_model")) and name.endswith((".safetensors", ".bin", ".index.json"))


def _publish(tmp: str, out_dir: str) -> None:
    """Move the finished model from ``tmp`` to ``out_dir``: a rename if
    ``out_dir`` is new or empty; else entry by entry, after removing the old
    weight files (a previous save's shards would mix with the new ones)."""
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    if not os.path.exists(out_dir):
        os.replace(tmp, out_dir)
        return
    for name in os.listdir(out_dir):
        if _is_weights(name) and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in os.listdir(tmp):
        target = os.path.join(out_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


# -- the merge -----------------------------------------------------------------------


def _lora_layer_names(model) -> set[str]:
    # The names wire.set_base_delta gives the LoRA layers (the server's PEFT model has the same).
    return {n for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}


def apply_base_delta(model, path: str) -> int:
    """Add ``base_delta.npz`` to the base weights of the LoRA layers (as the
    server did each round); return how many layers it changed."""
    import numpy as np

    from .. import wire

    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise MergeError(f"{path}: cannot read it ({e})") from e
    unknown = [k for k in arrays if not wire.is_delta(k)]
    if unknown:
        raise MergeError(f"{path}: unexpected entries {unknown[:3]} (expected <lora layer>{wire.DELTA}, or {wire.DELTA_U} / {wire.DELTA_V})")
    layers = _lora_layer_names(model)
    modules = {k.rsplit(".fedlora_delta", 1)[0] for k in arrays}
    if missing := sorted(modules - layers):
        raise MergeError(f"{path}: base deltas for {missing[:3]}, which are not LoRA layers of this adapter's model")
    try:
        wire.set_base_delta(model, arrays)
    except RuntimeError as e:  # a shape that does not match the layer
        raise MergeError(f"{path}: does not fit the model's LoRA layers ({e})") from e
    return len(modules)


def merge(run_dir: str, out_dir: str, *, dtype: str = "float32", force: bool = False, data_dir: str | None = None, base_model: str = "") -> str:
    """Merge the run's adapter (and base delta) into its base; write ``out_dir``; return it."""
    if dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    config = read_run(run_dir)
    config_path = os.path.join(run_dir, "config.json")
    settings = run_settings(config, config_path, data_dir, base_model)
    check_out_dir(out_dir, run_dir, force)

    import peft
    import torch

    from ..model import load_base, load_tokenizer, resolve_pooling

    task, labels = settings["task"], settings["labels"]
    tokenizer = load_tokenizer(settings["model"])
    # Upcast after loading (exact for a bfloat16/float16 checkpoint): the merge runs in float32.
    base = load_base(settings["model"], task, max(len(labels), 2)).float()
    if resolve_pooling(settings["pooling"], task, settings["model"], base) == "mean":
        _refuse_pooling(config_path, f"pooling = 'auto' on {settings['model']}, which declares mean pooling")
    adapter = os.path.join(run_dir, ADAPTER)
    try:
        model = peft.PeftModel.from_pretrained(base, adapter, is_trainable=False)
    except Exception as e:
        raise MergeError(f"{adapter}: cannot apply it to {settings['model']}: {type(e).__name__}: {e}") from e
    delta_path = os.path.join(adapter, BASE_DELTA)
    delta_layers = apply_base_delta(model, delta_path) if os.path.isfile(delta_path) else 0
    if settings["strategy"] == "fedsa-lora":
        print("note: FedSA-LoRA's global model has B = 0 (each node keeps its own B): its LoRA layers add nothing", file=sys.stderr)
    merged = model.merge_and_unload()
    merged = merged.to(getattr(torch, dtype)).eval()
    if task == "classification":
        merged.config.id2label = {i: str(name) for i, name in enumerate(labels)}
        merged.config.label2id = {str(name): i for i, name in enumerate(labels)}

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.{uuid.uuid4().hex}.partial")
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "run": os.path.abspath(run_dir),
            "task": task,
            "model": settings["model"],
            "strategy": settings["strategy"],
            "dtype": dtype,
            "base-delta-layers": delta_layers,
            "label-names": labels,
        }
        if os.path.isfile(os.path.join(run_dir, RESULT)):
            with open(os.path.join(run_dir, RESULT)) as f:
                info["result"] = json.load(f)
        with open(os.path.join(tmp, INFO), "w") as f:
            json.dump(info, f, indent=2)
        _publish(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out_dir
