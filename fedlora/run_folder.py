"""A run's folder on the server: naming, ``config.json``, ``metrics.jsonl``,
checkpoints, resume and ``result.json``. Files only: no model, no Flower.

``<output-dir>/<run-name>/`` holds ``config.json`` (the resolved config),
``metrics.jsonl`` (one object per round; round 0 is the initial model),
``checkpoint.json`` + ``checkpoint-round<N>.npz`` (the latest complete round)
and, once the run is complete, ``result.json`` and ``adapter/``.
"""

from __future__ import annotations

import json
import os
import sysconfig
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from .files import write_atomic, write_npz_atomic

CHECKPOINT = "checkpoint.json"
RESULT = "result.json"
EMA_PREFIX = "ema:"  # the moving average's arrays in a checkpoint (eval.ema-decay)
DATA_DIR_VAR = "$FEDLORA_DATA_DIR"  # how config.json writes the data directory


def config_diff(mine: dict, theirs: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between a resolved config and a checkpointed
    one. A key the checkpointed run predates (a setting added since) counts as
    its default: the old run behaved as the default does. A key removed since
    (e.g. ``num-partitions``, now node config) is not compared."""
    diff = []
    for key in sorted(mine):
        a, b = mine[key], theirs[key] if key in theirs else defaults.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += config_diff(a, b, defaults.get(key) or {}, f"{prefix}{key}.")
        elif a != b:
            diff.append(prefix + key)
    return diff


def portable(obj: Any, data_dir: str) -> Any:
    """``obj`` with absolute paths made machine-independent: under the data
    directory as ``$FEDLORA_DATA_DIR/...``, under the installed packages as
    ``site-packages/...``, under the working directory relative to it (the
    output folder). Committed results then mean the same on any machine."""
    roots = [(os.path.abspath(os.path.expanduser(data_dir)), DATA_DIR_VAR)] if data_dir else []
    roots.append((os.path.abspath(sysconfig.get_paths()["purelib"]), "site-packages"))
    roots.append((os.getcwd(), "."))

    def fix(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [fix(v) for v in value]
        if isinstance(value, str):
            for root, name in roots:
                for prefix in ("", "local:"):  # data sources are written "local:<path>"
                    if value == prefix + root or value.startswith(prefix + root + os.sep):
                        rest = value[len(prefix + root) :]
                        return prefix + (rest.lstrip(os.sep) or ".") if name == "." else prefix + name + rest
        return value

    return fix(obj)


def latest_checkpointed_run(parent: str, run_name: str = "") -> str | None:
    """The run to resume: ``run_name`` if given, else the newest checkpointed run in ``parent``."""
    if not os.path.isdir(parent):
        return None
    names = [run_name] if run_name else os.listdir(parent)
    runs = [os.path.join(parent, n) for n in names if os.path.isfile(os.path.join(parent, n, CHECKPOINT))]
    return max(runs, key=lambda d: os.path.getmtime(os.path.join(d, CHECKPOINT)), default=None)


def unique_dir(parent: str, name: str) -> str:
    path, i = os.path.join(parent, name), 2
    while os.path.exists(path):
        path, i = os.path.join(parent, f"{name}-{i}"), i + 1
    return path


class RunFolder:
    """One run's files. ``RunFolder.new`` makes a fresh folder; ``RunFolder(path)`` opens one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.metrics_path = os.path.join(path, "metrics.jsonl")

    @classmethod
    def new(cls, parent: str, name: str) -> RunFolder:
        path = unique_dir(parent, name)
        os.makedirs(path)
        return cls(path)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- JSON files -----------------------------------------------------------------

    def write_json(self, name: str, obj: Any) -> None:
        write_atomic(self.file(name), json.dumps(obj, indent=2, default=str).encode())

    def read_json(self, name: str) -> Any:
        with open(self.file(name)) as f:
            return json.load(f)

    # -- metrics.jsonl --------------------------------------------------------------

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def cum_bytes(self) -> dict[str, int]:
        """Bytes moved so far, as the last metrics row says (a resumed run continues them)."""
        rows = self.metrics()
        last = rows[-1] if rows else {}
        return {"up": last.get("cum_bytes_up", 0), "down": last.get("cum_bytes_down", 0)}

    # -- checkpoints ----------------------------------------------------------------

    def write_checkpoint(self, server_round: int, arrays: ArrayRecord, spent: dict, strategy_state: dict, ema: ArrayRecord | None = None) -> None:
        """Global state, round and strategy state (and the adapter's moving average, ``eval.ema-decay``),
        written atomically; older checkpoints removed."""
        name = f"checkpoint-round{server_round}.npz"
        out = {k: v.numpy() for k, v in arrays.items()}
        out.update({EMA_PREFIX + k: v.numpy() for k, v in (ema or {}).items()})
        write_npz_atomic(self.file(name), out)
        self.write_json(CHECKPOINT, {"round": server_round, "arrays": name, "spent": spent, "strategy-state": strategy_state})
        for old in os.listdir(self.path):  # keep only the checkpoint just written
            if old.startswith("checkpoint-round") and old != name:
                os.remove(self.file(old))

    def read_checkpoint(self) -> tuple[int, ArrayRecord, dict[int, float], dict]:
        """(round, global arrays, epsilon spent per node, strategy state) of the latest checkpoint
        (its moving average: ``read_ema``).

        Metrics written after it (a round that did not complete) are dropped."""
        ckpt = self.read_json(CHECKPOINT)
        with np.load(self.file(ckpt["arrays"])) as npz:
            arrays = ArrayRecord({k: Array(npz[k]) for k in npz.files if not k.startswith(EMA_PREFIX)})
        rows = [r for r in self.metrics() if r["round"] <= ckpt["round"]]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        spent = {int(k): float(v) for k, v in ckpt.get("spent", {}).items()}
        return int(ckpt["round"]), arrays, spent, ckpt.get("strategy-state", {})

    def read_ema(self) -> ArrayRecord | None:
        """The latest checkpoint's moving average of the global adapter; None if it has none."""
        ckpt = self.read_json(CHECKPOINT)
        with np.load(self.file(ckpt["arrays"])) as npz:
            ema = {k.removeprefix(EMA_PREFIX): Array(npz[k]) for k in npz.files if k.startswith(EMA_PREFIX)}
        return ArrayRecord(ema) if ema else None

    # -- the end of a run -----------------------------------------------------------

    def write_result(self) -> dict[str, Any]:
        """``result.json``, the mark of a complete run, from the metrics rows."""
        rows = self.metrics()
        last = rows[-1]
        measured = [r["accuracy"] for r in rows if r.get("accuracy") is not None]  # eval.every skips rounds; causal-lm may have none
        result = {
            "rounds": last["round"],
            "accuracy": last["accuracy"],
            "loss": last["loss"],
            "best_accuracy": max(measured) if measured else None,
            "epsilon": last["epsilon"],
            "cum_bytes_up": last["cum_bytes_up"],
            "cum_bytes_down": last["cum_bytes_down"],
            "round_seconds": sum(r["seconds"] for r in rows),
        }
        if "ema_accuracy" in last:  # eval.ema-decay > 0
            result.update({"ema_accuracy": last["ema_accuracy"], "best_ema_accuracy": max(r.get("ema_accuracy") or 0.0 for r in rows)})
        self.write_json(RESULT, result)
        return result
