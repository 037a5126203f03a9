"""The server side of a run, without Flower's grid: start-up validation, the
global model, centralised evaluation, and what each round writes. The run's
files (naming, config.json, metrics, checkpoints, resume) are
``fedlora.run_folder``'s.
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
from . import devices, validation, wire
from .config import ConfigError, RunConfig, parse_run_config
from .model import build_model, count_parameters, is_head, is_lora_a, is_lora_b, load_tokenizer, resolve_model
from .run_folder import RunFolder, config_diff, latest_checkpointed_run, portable
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


def _quality(measured: dict[str, float]) -> str:
    """The eval metrics for a log line: accuracy (exact match) when measured, loss, perplexity."""
    if measured["loss"] is None:
        return "not evaluated (eval.every)"
    parts = [f"acc {measured['accuracy']:.4f}"] if "accuracy" in measured else []
    parts.append(f"loss {measured['loss']:.4f}")
    if "perplexity" in measured:
        parts.append(f"ppl {measured['perplexity']:.2f}")
    return " ".join(parts)


class Experiment:
    """Everything the ServerApp does besides talking to nodes.

    The server does not need to know how many nodes the federation has: each
    node reports its own example count and noise multiplier, and the strategy
    is made (``make_strategy``) once the nodes that will train are connected."""

    def __init__(self, run: RunConfig, run_id: int | None = None) -> None:
        self.run = run
        self.method = get_strategy(run.strategy)
        if run.user_dp.mode == "client-fixed" and any(r != run.lora.r for r in run.lora.client_ranks):
            raise ConfigError(
                "user-dp.mode", "client-fixed", "Flower's fixedclipping_mod needs replies shaped as what was sent: with mixed ranks use server-fixed"
            )
        if run.user_dp.mode == "client-fixed" and run.wire_dtype != "float32":
            raise ConfigError("wire.dtype", run.wire_dtype, "Flower's fixedclipping_mod clips the arrays as they travel: with client-fixed use float32")
        if not self.method.mixed_ranks and any(r != run.lora.r for r in run.lora.client_ranks):
            raise ConfigError("lora.client-ranks", ",".join(map(str, run.lora.client_ranks)), f"strategy {run.strategy} cannot aggregate mixed ranks")
        check_available(run.tracking)
        # Load and check everything a run needs before any node trains.
        self.task = data_mod.load_task(run.data, kind=run.task)
        if run.partition.method == "pathological" and run.partition.classes_per_client > self.task.num_labels:
            raise ConfigError("partition.classes-per-client", run.partition.classes_per_client, f"exceeds the {self.task.num_labels} classes")
        if run.partition.method != "iid" and "label" not in self.task.train.column_names:
            raise ConfigError("partition.method", run.partition.method, "partitions by label, and this causal-lm dataset has no labels: use iid")
        if run.dp.enabled and run.fraction_evaluate > 0:
            log.warning("fraction-evaluate > 0 with DP: client-side evaluation metrics are released without DP")
        # The server evaluates centrally, on its own device (the run's `device`).
        self.device = devices.resolve_device(run.compute.device)
        devices.check_precision(run.compute, self.device)
        self.model = build_model(run, self.task.num_labels, self.method.train_lora_a, device=self.device)
        if run.compute.precision == "bf16":
            devices.keep_trainable_fp32(self.model)
        tokenizer = load_tokenizer(run.model)
        evals = self.task.eval
        if 0 < run.eval.max_examples < len(evals):
            evals = evals.select(range(run.eval.max_examples))  # a fixed subset: the same every round
        self.eval_split = evals
        self.eval_data = data_mod.encode(evals, tokenizer, self.task.text_columns, run.data.max_length)
        if self.eval_data.dropped:
            log.warning(
                "%d of %d evaluation examples do not fit max-length = %d (prompt + response): left out", self.eval_data.dropped, len(evals), run.data.max_length
            )
        if len(self.eval_data) == 0:
            raise ConfigError("max-length", run.data.max_length, "no evaluation example fits (prompt + response)")
        ex = self.method.exchange
        # The server's state: the method's global tensors (for most methods its trainable set).
        self.initial_arrays = wire.to_arrays(self.model, wire.global_names(self.model, ex))
        self.fingerprint = wire.fingerprint(self.model, ex)
        self.final_arrays = self.initial_arrays
        self.ema: ArrayRecord | None = None  # the moving average over rounds (eval.ema-decay)
        self.strategy: FedLoraStrategy | None = None

        self.start_round = 1  # the first round this process runs
        self.resumed_spent: dict[int, float] = {}
        self.resumed_state: dict = {}  # the strategy's own state (e.g. user-level DP releases)
        parent = os.path.abspath(os.path.expanduser(run.output_dir))
        previous = latest_checkpointed_run(parent, run.run_name) if run.resume else None
        if previous:
            self._resume_from(RunFolder(previous))
        else:
            if run.resume:
                log.warning("resume=true but no checkpointed run in %s: starting a new run", parent)
            self.folder = RunFolder.new(
                parent,
                run.run_name
                or "-".join(
                    [
                        run.strategy,
                        f"eps{run.dp.epsilon:g}" if run.dp.enabled else "nodp",
                        run.partition.method,
                        time.strftime("%Y%m%d-%H%M%S"),
                    ]
                ),
            )
            # Identifies the run to nodes across restarts: keys their privacy ledgers.
            self.run_key = uuid.uuid4().hex
        self.dir = self.folder.path
        self.cum_bytes = self.folder.cum_bytes()  # totals so far (a resumed run continues them)
        self.tracker = make_tracker(run.tracking, self.dir, self.folder.name, parent)
        if self.task.synthetic:
            log.warning(SYNTHETIC_BANNER)
        if previous:
            log.info("resuming %s after round %d", self.dir, self.start_round - 1)
            return
        self.tracker.log_config(run.raw)
        self.folder.write_json("config.json", self.portable(self._describe(run_id)))
        log.info(
            "run %s: %s on %s (%s), %d labels, payload %d tensors / %d bytes, output %s",
            self.folder.name,
            run.strategy,
            self.task.source,
            run.data.dataset,
            self.task.num_labels,
            len(self.initial_arrays),
            wire.nbytes(self.initial_arrays),
            self.dir,
        )

    def portable(self, obj: Any) -> Any:
        """``obj`` as config.json records it: paths relative to the data directory."""
        return portable(obj, self.run.data.data_dir)

    def _describe(self, run_id: int | None) -> dict[str, Any]:
        """config.json: the run config, as given and resolved, and what it ran on."""
        trainable, total = count_parameters(self.model)
        return {
            "run-config": self.run.raw,
            "resolved": self.run.to_dict(),
            "run-id": run_id,
            "data": {
                "source": self.task.source,
                "synthetic": self.task.synthetic,
                "label-names": list(self.task.label_names),
                "text-columns": list(self.task.text_columns),
                "train-examples": len(self.task.train),
                "eval-examples": len(self.eval_data),
                **({"eval-dropped-too-long": self.eval_data.dropped} if self.run.task == "causal-lm" else {}),
                # Accuracy of always predicting the most common eval label (answer): the bar to beat.
                "eval-majority-accuracy": self._majority(),
            },
            "model": {
                "path": "/".join(p for p in resolve_model(self.run.model) if p),
                "task": self.run.task,
                "device": str(self.device),
                "trainable-parameters": trainable,
                "parameters": total,
            },
            "payload": self._payload_sizes(),
            "shared-fingerprint": self.fingerprint,
            "run-key": self.run_key,
            # Each node calibrates its own noise multiplier for its data size; it reports it every round.
            "dp": {"accountant": "rdp"},
            "versions": _versions(),
        }

    def _majority(self) -> float:
        split = self.eval_split
        if "label" in split.column_names:
            answers = split["label"]
        elif data_mod.RESPONSE in split.column_names:
            answers = split[data_mod.RESPONSE]
        else:
            answers = [chat[-1]["content"] for chat in split[data_mod.MESSAGES]]
        return max(Counter(answers).values()) / len(answers)

    def _payload_sizes(self) -> dict[str, Any]:
        """What one upload holds, and its size against vanilla LoRA's (A and B,
        and the head if it trains) for the same layers: from the shapes, since
        FFA-LoRA's saving is not one half where A and B differ in size
        (B is d_out x r, A is r x d_in)."""
        up = wire.to_arrays(self.model, wire.up_names(self.model, self.method.exchange))
        lora = sum(p.numel() for n, p in self.model.named_parameters() if is_lora_a(n) or is_lora_b(n) or (is_head(n) and p.requires_grad))
        values = sum(int(np.prod(a.shape)) for a in up.values())
        return {
            "tensors": sorted(self.initial_arrays.keys()),
            "bytes": wire.nbytes(self.initial_arrays),
            "upload-values": values,
            "upload-bytes-on-wire": wire.nbytes(wire.encode(up, self.run.wire_dtype)),
            "wire-dtype": self.run.wire_dtype,
            "upload-values-vs-lora": values / lora if lora else None,
        }

    def _resume_from(self, folder: RunFolder) -> None:
        """Continue ``folder``'s run from its last complete round."""
        config = folder.read_json("config.json")
        # As JSON (tuples become lists), without the keys that may differ on a resume
        # (the folder was found from output-dir, which may be given relative to another directory).
        mine, theirs, defaults = (
            json.loads(json.dumps({k: v for k, v in d.items() if k not in ("resume", "run_name", "output_dir", "tracking")}))
            for d in (self.portable(self.run.to_dict()), self.portable(config["resolved"]), parse_run_config({}).to_dict())
        )
        if diff := config_diff(mine, theirs, defaults):
            raise ConfigError("resume", True, f"the run in {folder.path} was started with a different config ({', '.join(diff)})")
        if config["shared-fingerprint"] != self.fingerprint:
            raise ConfigError("resume", True, f"the run in {folder.path} has a different shared init (fingerprint)")
        last_round, arrays, self.resumed_spent, self.resumed_state = folder.read_checkpoint()
        self.folder, self.run_key = folder, config["run-key"]
        self.initial_arrays = self.final_arrays = arrays
        self.ema = folder.read_ema() if self.run.eval.ema_decay > 0 else None
        self.start_round = last_round + 1

    def checkpoint(self, server_round: int) -> None:
        """Global adapter, round and strategy state, written atomically after each round."""
        spent = self.strategy.spent if self.strategy else {}
        state = self.strategy.state() if self.strategy else {}
        self.folder.write_checkpoint(server_round, self.final_arrays, spent, state, ema=self.ema)

    def client_config(self) -> dict[str, Any]:
        """Sent with every message: what a node needs that its own run config cannot tell it."""
        return {"label-names": list(self.task.label_names), "run-key": self.run_key}

    def _user_dp(self, num_nodes: int) -> UserDP | None:
        """Central user-level DP, calibrated for the clients sampled per round
        (as FedAvg samples them from ``num_nodes`` connected nodes)."""
        run, u = self.run, self.run.user_dp
        if not u.enabled:
            return None
        per_round = max(int(num_nodes * run.fraction_train), run.min_train_nodes)
        return UserDP(u.mode, u.noise_multiplier, u.clip_norm, u.delta, per_round, u.clipped_count_stddev)

    def make_strategy(self, num_nodes: int | None = None) -> FedLoraStrategy:
        """The run's strategy, for ``num_nodes`` connected nodes (default: min-train-nodes)."""
        run = self.run
        num_nodes = max(num_nodes or 0, run.min_train_nodes)
        self.strategy = self.method(
            payload_shapes={k: tuple(v.shape) for k, v in wire.to_arrays(self.model, wire.up_names(self.model, self.method.exchange)).items()},
            down_keys=wire.down_names(self.model, self.method.exchange),
            lora_scale=run.lora.alpha / run.lora.r,
            min_replies=run.min_replies,
            max_norm_ratio=run.max_norm_ratio,
            max_weight_share=run.max_weight_share,
            aggregation=run.aggregation,
            trim_fraction=run.trim_fraction,
            clip_norm=run.clip_norm,
            fingerprint=self.fingerprint,
            extra_config=self.client_config(),
            fraction_train=run.fraction_train,
            fraction_evaluate=run.fraction_evaluate,
            min_train_nodes=run.min_train_nodes,
            min_evaluate_nodes=run.min_train_nodes if run.fraction_evaluate > 0 else 0,
            min_available_nodes=run.min_train_nodes,
            user_dp=self._user_dp(num_nodes),
            wire_dtype=run.wire_dtype,
            update_bound=validation.UpdateBound.from_run(run),
        )
        self.strategy.spent.update(self.resumed_spent)
        self.strategy.load_state(self.resumed_state)
        return self.strategy

    def _evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        """The evaluation split's metrics for the global ``arrays`` (loaded into the model)."""
        wire.load_global(self.model, arrays, self.method.exchange)
        run = self.run
        precision = (lambda: devices.autocast(run.compute, self.device)) if run.compute.precision == "bf16" else None
        return evaluate(
            self.model, self.eval_data, run.train.eval_batch_size, precision=precision, generate=run.eval.generate, max_new_tokens=run.eval.max_new_tokens
        )

    def update_ema(self, arrays: ArrayRecord) -> ArrayRecord:
        """Fold a round's global ``arrays`` into the moving average (``eval.ema-decay``); the
        first round's arrays start it. Each tensor is averaged on its own: for methods whose
        global state is A and B, the average of the factors is not the factor of the averaged
        product (for FFA-LoRA, A is fixed, so it is exactly the average of the updates)."""
        d = self.run.eval.ema_decay
        if self.ema is None:
            self.ema = ArrayRecord({k: Array(v.numpy().copy()) for k, v in arrays.items()})
        else:
            self.ema = ArrayRecord({k: Array((d * self.ema[k].numpy() + (1 - d) * v.numpy()).astype(v.numpy().dtype)) for k, v in arrays.items()})
        return self.ema

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralised evaluation of the global adapter (and of its moving average, with
        ``eval.ema-decay``) in the rounds ``eval.every`` picks; writes the round's metrics
        line (``accuracy`` / ``loss`` null in the others)."""
        self.final_arrays = arrays
        stats = self.strategy.rounds.get(server_round) if self.strategy else None
        due = self.evaluates(server_round)
        ema = None
        if stats and self.run.eval.ema_decay > 0:
            averaged = self.update_ema(arrays)  # every round: skipping evaluations must not change the average
            ema = self._evaluate(averaged) if due else None
        measured = self._evaluate(arrays) if due else {"loss": None}
        acc, loss = measured.get("accuracy"), measured["loss"]  # causal-lm without eval.generate: no accuracy
        row = self._metrics_row(server_round, acc, loss, stats)
        row.update({k: v for k, v in measured.items() if k not in ("accuracy", "loss")})  # perplexity, exact_match
        if ema is not None:
            row.update({"ema_accuracy": ema.get("accuracy"), "ema_loss": ema["loss"]})
        self.folder.append_metrics(row)
        self.tracker.log_round(server_round, round_scalars(row))
        if stats:
            self.checkpoint(server_round)
        eps = f"eps {row['epsilon']:.3f}/{self.run.dp.epsilon:g}" if self.run.dp.enabled else "non-private"
        if stats:
            log.info(
                "round %d/%d | %s | %s | %s | up %.1f KB down %.1f KB | %d/%d clients%s | %.1fs",
                server_round,
                self.run.num_server_rounds,
                self.run.strategy,
                _quality(measured) + (f" | ema {_quality(ema)}" if ema is not None else ""),
                eps,
                row["bytes_up"] / 1024,
                row["bytes_down"] / 1024,
                stats.replies,
                stats.sampled,
                f" ({len(stats.failures)} failed)" if stats.failures else "",
                row["seconds"],
            )
        else:
            log.info("round 0 (initial model) | %s", _quality(measured))
        return MetricRecord({k: v for k, v in measured.items() if v is not None})  # empty in a round eval.every skips

    def evaluates(self, server_round: int) -> bool:
        """Whether the server evaluates after ``server_round``: round 0, the last round, and
        every ``eval.every``-th."""
        return server_round in (0, self.run.num_server_rounds) or server_round % self.run.eval.every == 0

    def _metrics_row(self, server_round: int, acc: float, loss: float, stats) -> dict[str, Any]:
        """One line of metrics.jsonl."""
        now = time.perf_counter()
        row: dict[str, Any] = {
            "round": server_round,
            "strategy": self.run.strategy,
            "accuracy": acc,
            "loss": loss,
            "epsilon": stats.epsilon if stats else 0.0,
            **({"user_epsilon": stats.user_epsilon} if stats and stats.user_epsilon is not None else {}),
            "bytes_up": stats.bytes_up if stats else 0,
            "bytes_down": stats.bytes_down if stats else 0,
            "seconds": (now - stats.started) if stats else 0.0,
        }
        if stats:
            self.cum_bytes = {"up": self.cum_bytes["up"] + stats.bytes_up, "down": self.cum_bytes["down"] + stats.bytes_down}
        row.update({"cum_bytes_up": self.cum_bytes["up"], "cum_bytes_down": self.cum_bytes["down"]})
        if stats:
            cm = list(stats.client_metrics.values())
            total = sum(float(m["num-examples"]) for m in cm) or 1.0
            row.update(
                {
                    "clients": stats.replies,
                    "sampled": stats.sampled,
                    "failures": len(stats.failures),
                    "failure_reasons": stats.failures,
                    # Only without DP: the loss on private batches is not privatised.
                    "train_loss": sum(float(m["train-loss"]) * float(m["num-examples"]) for m in cm) / total
                    if cm and all("train-loss" in m for m in cm)
                    else None,
                    "train_seconds_max": max((float(m["train-seconds"]) for m in cm), default=0.0),
                    "client_seconds_max": max((float(m["client-seconds"]) for m in cm), default=0.0),
                    **({"client_eval_accuracy": stats.client_eval["accuracy"], "client_eval_loss": stats.client_eval["loss"]} if stats.client_eval else {}),
                    # Per client: node id -> what it reported (examples, loss, epsilon, timings).
                    "client_metrics": {str(node): m for node, m in stats.client_metrics.items()},
                }
            )
        return row

    def finish(self) -> str:
        """Save the final global adapter in PEFT format and ``result.json`` (the
        mark of a complete run); return the adapter's path."""
        wire.load_global(self.model, self.final_arrays, self.method.exchange)
        path = self.folder.file("adapter")
        for peft_config in getattr(self.model, "peft_config", {}).values():
            # The model as the run config names it (a hub id, or a path as given), not where this machine found it.
            peft_config.base_model_name_or_path = self.portable(self.run.model)
        # Adapters never target embeddings; PEFT's "auto" check would look the base model up on the hub.
        self.model.save_pretrained(path, save_embedding_layers=False)
        if self.ema is not None:  # eval.ema-decay: the moving average, beside the last round's adapter
            wire.load_global(self.model, self.ema, self.method.exchange)
            self.model.save_pretrained(self.folder.file("adapter-ema"), save_embedding_layers=False)
            if deltas := {k: v.numpy() for k, v in self.ema.items() if wire.is_delta(k)}:
                np.savez(os.path.join(self.folder.file("adapter-ema"), "base_delta.npz"), **deltas)
            wire.load_global(self.model, self.final_arrays, self.method.exchange)
        if deltas := {k: v.numpy() for k, v in self.final_arrays.items() if wire.is_delta(k)}:
            # FedEx-LoRA / FLoRA: the update merged into the base weights (load with wire.set_base_delta).
            np.savez(os.path.join(path, "base_delta.npz"), **deltas)
        self.folder.write_result()
        self.tracker.close()
        if self.task.synthetic:
            log.warning(SYNTHETIC_BANNER)
        log.info("run finished: outputs in %s", self.dir)
        return path
