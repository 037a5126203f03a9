"""The server side of a run, without Flower's grid: start-up validation, the
global model, centralised evaluation, and the run's outputs.

``<output-dir>/<run-name>/`` gets ``config.json`` (the resolved config),
``metrics.jsonl`` (one object per round; round 0 is the initial model) and
``adapter/`` (the final global adapter in PEFT format).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import uuid
from collections import Counter
from importlib import metadata
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

from . import data as data_mod
from . import wire
from .config import ConfigError, RunConfig, parse_run_config
from .files import write_atomic, write_npz_atomic
from .model import build_model, count_parameters, load_tokenizer, resolve_model
from .node import train_size_after_holdout
from .privacy import PrivacyLedger
from .strategies import FedLoraStrategy, get_strategy
from .tracking import check_available, make_tracker, round_scalars
from .training import evaluate
from .user_dp import UserDP

log = logging.getLogger("fedlora")

SYNTHETIC_BANNER = (
    "!!! This run used the BUILT-IN SYNTHETIC task, not SST-2: no local copy "
    "(data-dir / FEDLORA_DATA_DIR) and no hub access. Point data-dir at a folder "
    "with sst2/train*.jsonl to use the real data. !!!"
)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("flwr", "torch", "transformers", "peft", "opacus", "datasets", "flwr-datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


CHECKPOINT = "checkpoint.json"


def _config_diff(mine: dict, theirs: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between a resolved config and a checkpointed
    one. A key the checkpointed run predates (a setting added since) counts as
    its default: the old run behaved as the default does."""
    diff = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs[key] if key in theirs else defaults.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += _config_diff(a, b, defaults.get(key) or {}, f"{prefix}{key}.")
        elif key not in mine or a != b:
            diff.append(prefix + key)
    return diff


def latest_checkpointed_run(parent: str, run_name: str = "") -> str | None:
    """The run to resume: ``run_name`` if given, else the newest checkpointed run in ``parent``."""
    if not os.path.isdir(parent):
        return None
    names = [run_name] if run_name else os.listdir(parent)
    runs = [os.path.join(parent, n) for n in names if os.path.isfile(os.path.join(parent, n, CHECKPOINT))]
    return max(runs, key=lambda d: os.path.getmtime(os.path.join(d, CHECKPOINT)), default=None)


def _unique_dir(parent: str, name: str) -> str:
    path, i = os.path.join(parent, name), 2
    while os.path.exists(path):
        path, i = os.path.join(parent, f"{name}-{i}"), i + 1
    return path


class Experiment:
    """Everything the ServerApp does besides talking to nodes."""

    def __init__(self, run: RunConfig, run_id: int | None = None) -> None:
        self.run = run
        self.method = get_strategy(run.strategy)
        if run.user_dp.mode == "client-fixed" and any(r != run.lora.r for r in run.lora.client_ranks):
            raise ConfigError("user-dp.mode", "client-fixed", "Flower's fixedclipping_mod needs replies shaped as what was sent: with mixed ranks use server-fixed")
        if not self.method.mixed_ranks and any(r != run.lora.r for r in run.lora.client_ranks):
            raise ConfigError("lora.client-ranks", ",".join(map(str, run.lora.client_ranks)), f"strategy {run.strategy} cannot aggregate mixed ranks")
        check_available(run.tracking)
        # Load and check everything a run needs before any node trains.
        self.task = data_mod.load_task(run.data)
        if run.partition.method == "pathological" and run.partition.classes_per_client > self.task.num_labels:
            raise ConfigError("partition.classes-per-client", run.partition.classes_per_client, f"exceeds the {self.task.num_labels} classes")
        self.partition_sizes = [
            len(data_mod.partition(self.task.train, run.partition, i, run.partition.num_partitions, run.seed))
            for i in range(run.partition.num_partitions)
        ]
        # Each simulated client's noise multiplier, calibrated as the client will:
        # an unreachable budget fails here, not in every client.
        train_sizes = [
            train_size_after_holdout(n, run.train.local_eval_fraction) if run.fraction_evaluate > 0 else n
            for n in self.partition_sizes
        ]
        if min(train_sizes) < 1:
            raise ConfigError("local-eval-fraction", run.train.local_eval_fraction, f"leaves a partition without training data (sizes {self.partition_sizes})")
        self.noise_multipliers = [
            PrivacyLedger.plan(run.dp, n, run.train.batch_size, run.num_server_rounds * run.train.local_steps).noise_multiplier
            for n in train_sizes
        ] if run.dp.enabled else []
        if run.dp.enabled and run.fraction_evaluate > 0:
            log.warning("fraction-evaluate > 0 with DP: client-side evaluation metrics are released without DP")
        self.model = build_model(run, self.task.num_labels, self.method.train_lora_a)
        tokenizer = load_tokenizer(run.model)
        self.eval_data = data_mod.encode(self.task.eval, tokenizer, self.task.text_columns, run.data.max_length)
        ex = self.method.exchange
        # The server's state: the method's global tensors (for most methods its trainable set).
        self.initial_arrays = wire.to_arrays(self.model, wire.global_names(self.model, ex))
        self.fingerprint = wire.fingerprint(self.model, ex)
        self.final_arrays = self.initial_arrays
        self.strategy: FedLoraStrategy | None = None

        self.start_round = 1  # the first round this process runs
        self.resumed_spent: dict[int, float] = {}
        self.resumed_state: dict = {}  # the strategy's own state (e.g. user-level DP releases)
        parent = os.path.abspath(os.path.expanduser(run.output_dir))
        previous = latest_checkpointed_run(parent, run.run_name) if run.resume else None
        if previous:
            self._resume_from(previous)
            name = os.path.basename(previous)
        else:
            if run.resume:
                log.warning("resume=true but no checkpointed run in %s: starting a new run", parent)
            name = run.run_name or "-".join([
                run.strategy, f"eps{run.dp.epsilon:g}" if run.dp.enabled else "nodp",
                run.partition.method, time.strftime("%Y%m%d-%H%M%S"),
            ])
            self.dir = _unique_dir(parent, name)
            os.makedirs(self.dir)
            # Identifies the run to nodes across restarts: keys their privacy ledgers.
            self.run_key = uuid.uuid4().hex
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        # Totals so far (a resumed run continues them from its metrics).
        self.cum_bytes = {"up": 0, "down": 0}
        if os.path.exists(self.metrics_path):
            for line in open(self.metrics_path):
                prev = json.loads(line)
                self.cum_bytes = {"up": prev.get("cum_bytes_up", 0), "down": prev.get("cum_bytes_down", 0)}
        self.tracker = make_tracker(run.tracking, self.dir, os.path.basename(self.dir), parent)
        if self.task.synthetic:
            log.warning(SYNTHETIC_BANNER)
        if previous:
            log.info("resuming %s after round %d", self.dir, self.start_round - 1)
            return
        trainable, total = count_parameters(self.model)
        self.tracker.log_config(run.raw)
        self._write_json("config.json", {
            "run-config": run.raw,
            "resolved": run.to_dict(),
            "run-id": run_id,
            "data": {
                "source": self.task.source, "synthetic": self.task.synthetic,
                "label-names": list(self.task.label_names), "text-columns": list(self.task.text_columns),
                "train-examples": len(self.task.train), "eval-examples": len(self.task.eval),
                "partition-sizes": self.partition_sizes,
                # Accuracy of always predicting the most common eval label: the bar to beat.
                "eval-majority-accuracy": max(Counter(self.task.eval["label"]).values()) / len(self.task.eval),
            },
            "model": {"path": resolve_model(run.model), "trainable-parameters": trainable, "parameters": total},
            "payload": {"tensors": sorted(self.initial_arrays.keys()), "bytes": wire.nbytes(self.initial_arrays)},
            "shared-fingerprint": self.fingerprint,
            "run-key": self.run_key,
            "dp": {"noise-multipliers (simulated partitions)": self.noise_multipliers, "accountant": "rdp"},
            "versions": _versions(),
        })
        log.info(
            "run %s: %s on %s (%s), %d labels, partitions %s, payload %d tensors / %d bytes, output %s",
            name, run.strategy, self.task.source, run.data.dataset, self.task.num_labels,
            self.partition_sizes, len(self.initial_arrays), wire.nbytes(self.initial_arrays), self.dir,
        )

    def _write_json(self, name: str, obj: Any) -> None:
        write_atomic(os.path.join(self.dir, name), json.dumps(obj, indent=2, default=str).encode())

    def _resume_from(self, run_dir: str) -> None:
        """Continue ``run_dir`` from its last complete round."""
        config = json.load(open(os.path.join(run_dir, "config.json")))
        # As JSON (tuples become lists), without the keys that may differ on a resume.
        mine, theirs, defaults = (
            json.loads(json.dumps({k: v for k, v in d.items() if k not in ("resume", "run_name", "tracking")}))
            for d in (self.run.to_dict(), config["resolved"], parse_run_config({}).to_dict())
        )
        if diff := _config_diff(mine, theirs, defaults):
            raise ConfigError("resume", True, f"the run in {run_dir} was started with a different config ({', '.join(diff)})")
        if config["shared-fingerprint"] != self.fingerprint:
            raise ConfigError("resume", True, f"the run in {run_dir} has a different shared init (fingerprint)")
        ckpt = json.load(open(os.path.join(run_dir, CHECKPOINT)))
        with np.load(os.path.join(run_dir, ckpt["arrays"])) as npz:
            arrays = ArrayRecord({k: Array(npz[k]) for k in npz.files})
        self.dir, self.run_key = run_dir, config["run-key"]
        self.initial_arrays = self.final_arrays = arrays
        self.start_round = int(ckpt["round"]) + 1
        self.resumed_spent = {int(k): float(v) for k, v in ckpt.get("spent", {}).items()}
        self.resumed_state = ckpt.get("strategy-state", {})
        # Metrics written after the checkpoint (a round that did not complete) are dropped.
        path = os.path.join(run_dir, "metrics.jsonl")
        rows = [line for line in open(path) if json.loads(line)["round"] <= ckpt["round"]] if os.path.exists(path) else []
        write_atomic(path, "".join(rows).encode())

    def checkpoint(self, server_round: int) -> None:
        """Global adapter, round and strategy state, written atomically after each round."""
        name = f"checkpoint-round{server_round}.npz"
        write_npz_atomic(os.path.join(self.dir, name), {k: v.numpy() for k, v in self.final_arrays.items()})
        spent = self.strategy.spent if self.strategy else {}
        state = self.strategy.state() if self.strategy else {}
        write_atomic(os.path.join(self.dir, CHECKPOINT), json.dumps({"round": server_round, "arrays": name, "spent": spent, "strategy-state": state}).encode())
        for old in os.listdir(self.dir):  # keep only the checkpoint just written
            if old.startswith("checkpoint-round") and old != name:
                os.remove(os.path.join(self.dir, old))

    def client_config(self) -> dict[str, Any]:
        """Sent with every message: what a node needs that its own run config cannot tell it."""
        return {"label-names": list(self.task.label_names), "run-key": self.run_key}

    def _user_dp(self) -> UserDP | None:
        """Central user-level DP, calibrated for the clients sampled per round (as FedAvg samples them)."""
        run, u = self.run, self.run.user_dp
        if not u.enabled:
            return None
        n = run.partition.num_partitions
        per_round = max(int(n * run.fraction_train), min(run.min_train_nodes, n))
        return UserDP(u.mode, u.noise_multiplier, u.clip_norm, u.delta, per_round, u.clipped_count_stddev)

    def make_strategy(self) -> FedLoraStrategy:
        run = self.run
        self.strategy = self.method(
            payload_shapes={k: tuple(v.shape) for k, v in wire.to_arrays(self.model, wire.up_names(self.model, self.method.exchange)).items()},
            down_keys=wire.down_names(self.model, self.method.exchange),
            lora_scale=run.lora.alpha / run.lora.r,
            min_replies=run.min_replies,
            max_norm_ratio=run.max_norm_ratio,
            aggregation=run.aggregation,
            trim_fraction=run.trim_fraction,
            clip_norm=run.clip_norm,
            fingerprint=self.fingerprint,
            extra_config=self.client_config(),
            fraction_train=run.fraction_train,
            fraction_evaluate=run.fraction_evaluate,
            min_train_nodes=min(run.min_train_nodes, run.partition.num_partitions),
            min_evaluate_nodes=min(run.min_train_nodes, run.partition.num_partitions) if run.fraction_evaluate > 0 else 0,
            min_available_nodes=run.partition.num_partitions,
            user_dp=self._user_dp(),
        )
        self.strategy.spent.update(self.resumed_spent)
        self.strategy.load_state(self.resumed_state)
        return self.strategy

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralised evaluation of the global adapter; writes the round's metrics line."""
        wire.load_global(self.model, arrays, self.method.exchange)
        self.final_arrays = arrays
        loss, acc = evaluate(self.model, self.eval_data, self.run.train.eval_batch_size)
        stats = self.strategy.rounds.get(server_round) if self.strategy else None
        now = time.perf_counter()
        row: dict[str, Any] = {
            "round": server_round, "strategy": self.run.strategy, "accuracy": acc, "loss": loss,
            "epsilon": stats.epsilon if stats else 0.0,
            **({"user_epsilon": stats.user_epsilon} if stats and stats.user_epsilon is not None else {}),
            "bytes_up": stats.bytes_up if stats else 0, "bytes_down": stats.bytes_down if stats else 0,
            "seconds": (now - stats.started) if stats else 0.0,
        }
        if stats:
            self.cum_bytes = {"up": self.cum_bytes["up"] + stats.bytes_up, "down": self.cum_bytes["down"] + stats.bytes_down}
        row.update({"cum_bytes_up": self.cum_bytes["up"], "cum_bytes_down": self.cum_bytes["down"]})
        if stats:
            cm = list(stats.client_metrics.values())
            total = sum(float(m["num-examples"]) for m in cm) or 1.0
            row.update({
                "clients": stats.replies, "sampled": stats.sampled, "failures": len(stats.failures),
                "failure_reasons": stats.failures,
                # Only without DP: the loss on private batches is not privatised.
                "train_loss": sum(float(m["train-loss"]) * float(m["num-examples"]) for m in cm) / total if cm and all("train-loss" in m for m in cm) else None,
                "train_seconds_max": max((float(m["train-seconds"]) for m in cm), default=0.0),
                "client_seconds_max": max((float(m["client-seconds"]) for m in cm), default=0.0),
                **({"client_eval_accuracy": stats.client_eval["accuracy"], "client_eval_loss": stats.client_eval["loss"]} if stats.client_eval else {}),
                # Per client: node id -> what it reported (examples, loss, epsilon, timings).
                "client_metrics": {str(node): m for node, m in stats.client_metrics.items()},
            })
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log_round(server_round, round_scalars(row))
        if stats:
            self.checkpoint(server_round)
        eps = f"eps {row['epsilon']:.3f}/{self.run.dp.epsilon:g}" if self.run.dp.enabled else "non-private"
        if stats:
            log.info(
                "round %d/%d | %s | acc %.4f loss %.4f | %s | up %.1f KB down %.1f KB | %d/%d clients%s | %.1fs",
                server_round, self.run.num_server_rounds, self.run.strategy, acc, loss, eps,
                row["bytes_up"] / 1024, row["bytes_down"] / 1024, stats.replies, stats.sampled,
                f" ({len(stats.failures)} failed)" if stats.failures else "", row["seconds"],
            )
        else:
            log.info("round 0 (initial model) | acc %.4f loss %.4f", acc, loss)
        return MetricRecord({"accuracy": acc, "loss": loss})

    def finish(self) -> str:
        """Save the final global adapter in PEFT format and ``result.json`` (the
        mark of a complete run); return the adapter's path."""
        wire.load_global(self.model, self.final_arrays, self.method.exchange)
        path = os.path.join(self.dir, "adapter")
        self.model.save_pretrained(path)
        if deltas := {k: v.numpy() for k, v in self.final_arrays.items() if wire.is_delta(k)}:
            # FedEx-LoRA / FLoRA: the update merged into the base weights (load with wire.set_base_delta).
            np.savez(os.path.join(path, "base_delta.npz"), **deltas)
        rows = [json.loads(line) for line in open(self.metrics_path)]
        last = rows[-1]
        self._write_json("result.json", {
            "rounds": last["round"], "accuracy": last["accuracy"], "loss": last["loss"],
            "best_accuracy": max(r["accuracy"] for r in rows), "epsilon": last["epsilon"],
            "cum_bytes_up": last["cum_bytes_up"], "cum_bytes_down": last["cum_bytes_down"],
            "round_seconds": sum(r["seconds"] for r in rows),
        })
        self.tracker.close()
        if self.task.synthetic:
            log.warning(SYNTHETIC_BANNER)
        log.info("run finished: outputs in %s", self.dir)
        return path
