"""A client node's work, without Flower: build (once) and train/evaluate.

``NodeRuntime`` is what a node works with in a round: the model and its DP
wrapper (built once per process and shared by the nodes that process serves,
since each round first loads the global payload), and the node's tokenised
data (cached per node in memory and on the node's disk, ``cache-dir``, for
deployments where a ClientApp process may start per message). What must
survive a process (privacy ledger, last reply, personal tensors) lives in the
node's ``NodeStore`` (and the ledger also in its Flower state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from . import data as data_mod
from . import devices, policy, privacy, training, wire
from .config import ConfigError, NodeConfig, RunConfig, cache_dir, default_state_dir, parse_node_config, policy_binds
from .model import build_model, is_head, load_tokenizer
from .node_store import NodeStore, SourceLedger, arrays_digest, private_dir

log = logging.getLogger("fedlora")


class FingerprintMismatch(RuntimeError):
    """This node's shared frozen tensors (e.g. FFA-LoRA's A) are not the run's."""


class NonFiniteUpdate(RuntimeError):
    """Training produced a non-finite update; the node does not send it."""


def zero_nonfinite_examples(params) -> int:
    """Set to zero every per-sample gradient (Opacus' ``grad_sample``) of an example
    whose gradient is non-finite in any parameter; return how many examples.

    Without this, one example with an infinite gradient makes the clipped sum NaN
    (Opacus' clip factor times inf), and whether the update is finite would tell
    whether that example was drawn: a signal the accountant does not cover. A
    zero gradient is within the clipping bound, so the guarantee is unchanged."""
    samples = [p for p in params if getattr(p, "grad_sample", None) is not None]
    if not samples:
        return 0
    for p in samples:  # Opacus may keep a list of per-sample gradients per parameter
        if isinstance(p.grad_sample, list):
            p.grad_sample = torch.cat(p.grad_sample, dim=0)
    bad = torch.zeros(samples[0].grad_sample.shape[0], dtype=torch.bool, device=samples[0].grad_sample.device)
    for p in samples:
        bad |= ~torch.isfinite(p.grad_sample.reshape(p.grad_sample.shape[0], -1)).all(dim=1)
    if bad.any():
        for p in samples:
            p.grad_sample[bad] = 0
    return int(bad.sum())


def drop_nonfinite_examples(optimizer):
    """``optimizer`` (an Opacus DPOptimizer) with ``zero_nonfinite_examples`` run before each clipping."""
    clip_and_accumulate = optimizer.clip_and_accumulate

    def sanitised_clip_and_accumulate() -> None:
        if dropped := zero_nonfinite_examples(optimizer.params):
            log.warning("%d example(s) with a non-finite gradient contributed zero to this step", dropped)
        clip_and_accumulate()

    optimizer.clip_and_accumulate = sanitised_clip_and_accumulate
    return optimizer


class LedgerMismatch(RuntimeError):
    """A stored privacy ledger does not match what this node plans for the run: refused, not trusted."""


def round_generator(seed: int, server_round: int, stream: int, purpose: int) -> torch.Generator:
    """Randomness for one (round, node, purpose), independent of history."""
    digest = hashlib.sha256(f"{seed}/{server_round}/{stream}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _entropy_generator() -> torch.Generator:
    """Seeded from OS entropy (std::random_device): non-private batch order on
    deployed nodes. (torch's default generator starts from a fixed seed in
    every fresh process.)"""
    g = torch.Generator()
    g.seed()
    return g


@dataclass
class NodeRuntime:
    run: RunConfig
    model: nn.Module
    train_data: data_mod.Encoded
    eval_data: data_mod.Encoded | None
    stream: int  # partition id, or a hash of the node's data path: seeds this node's randomness
    private: bool  # node brings its own data (deployment): DP noise is not seeded
    dp_model: nn.Module | None = None
    precision: training.Precision = None  # the forward passes' autocast (bf16), or None

    @property
    def device(self) -> torch.device:
        return training.device_of(self.model)

    @property
    def num_examples(self) -> int:
        return len(self.train_data)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


# One Ray actor (or one process) serves many nodes in turn, so caches are per
# process: the model is shared by every node of a run (each round first loads
# the global payload into it, and the rest is the same shared init), the
# tokenised data is per node. Bounded so a long grid of runs does not grow.
_MODELS: dict[str, tuple[nn.Module, nn.Module | None]] = {}
_NODE_DATA: dict[str, tuple] = {}
_MAX_NODES_PER_PROCESS = 64


def _model_key(run: RunConfig, label_names: tuple[str, ...], train_lora_a: bool, device: torch.device) -> str:
    blob = repr(
        (
            run.model,
            run.task,
            run.pooling,
            run.model_dropout,
            run.strategy,
            run.lora,
            run.seed,
            run.train_head,
            run.dp.per_sample,
            run.compute,
            str(device),
            label_names,
            train_lora_a,
        )
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _data_key(run: RunConfig, node_config: dict, label_names: tuple[str, ...]) -> str:
    blob = repr(
        (run.task, run.data, run.partition, run.seed, run.model, run.fraction_evaluate, run.train.local_eval_fraction, sorted(node_config.items()), label_names)
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def node_dataset(run: RunConfig, node_config: dict, label_names: tuple[str, ...]):
    """(dataset, text columns, cache key, stream id, brings-own-data) for this node."""
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        ds = data_mod.load_node_data(path, run.data, label_names, run.task)
        key = data_mod.file_signature(f"local:{path}")
        return ds, run.data.text_columns, key, int(hashlib.sha256(path.encode()).hexdigest()[:7], 16), True
    if "partition-id" not in node_config:
        raise ConfigError("node-config", dict(node_config), "needs 'data-path' (deployment) or 'partition-id' (simulation)")
    # Flower's simulation gives every node both: this node's partition is one of num-partitions.
    if "num-partitions" not in node_config:
        raise ConfigError("node-config", dict(node_config), "a simulated node needs 'num-partitions' next to 'partition-id'")
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    task = _load_task_cached(run, label_names)
    ds = data_mod.partition(task.train, run.partition, pid, num, run.seed)
    p = run.partition
    key = f"{data_mod.file_signature(task.source)}|{p.method}|{p.alpha}|{p.classes_per_client}|{pid}/{num}|{run.seed}"
    return ds, task.text_columns, key, pid, False


_TASKS: dict[str, data_mod.Task] = {}


def _load_task_cached(run: RunConfig, label_names: tuple[str, ...]) -> data_mod.Task:
    key = repr((run.task, run.data, label_names))
    if key not in _TASKS:
        _TASKS[key] = data_mod.load_task(run.data, label_names=label_names, kind=run.task)
    return _TASKS[key]


def node_rank(run: RunConfig, node_config: dict) -> int:
    """This node's LoRA rank: node config ``lora-rank`` (deployment), else its
    entry of ``lora.client-ranks`` (simulation), else ``lora.r``."""
    if "lora-rank" in node_config:
        rank = node_config["lora-rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= run.lora.r:
            raise ConfigError("lora-rank", rank, f"node config: must be an integer in 1..lora.r ({run.lora.r})")
        return rank
    if run.lora.client_ranks and "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if pid >= len(run.lora.client_ranks):
            raise ConfigError("lora.client-ranks", ",".join(map(str, run.lora.client_ranks)), f"needs one rank per simulated node: none for partition-id {pid}")
        return run.lora.client_ranks[pid]
    return run.lora.r


def get_runtime(run: RunConfig, node_config: dict, label_names: tuple[str, ...], train_lora_a: bool, mixed_ranks: str = "zero-padding") -> NodeRuntime:
    """This node's runtime: built on first use in this process, then reused.

    A node of a lower rank r_k gets LoRA layers of rank r_k with alpha scaled by
    r_k / r, so its layers have the run's scale alpha / r; ``mixed_ranks`` is how
    the strategy aggregates them ("" = it cannot: refused)."""
    start = time.perf_counter()
    rank = node_rank(run, node_config)
    if rank != run.lora.r:
        if not mixed_ranks:
            raise ConfigError("lora-rank", rank, f"this node's rank differs from lora.r = {run.lora.r}, and the run's strategy cannot aggregate mixed ranks")
        run = dataclasses.replace(run, lora=dataclasses.replace(run.lora, r=rank, alpha=run.lora.alpha * rank / run.lora.r))
    dkey = _data_key(run, node_config, label_names)
    if dkey in _NODE_DATA:
        _NODE_DATA[dkey] = _NODE_DATA.pop(dkey)  # most recently used last: eviction takes the least recently used
    else:
        if len(_NODE_DATA) >= _MAX_NODES_PER_PROCESS:
            _NODE_DATA.pop(next(iter(_NODE_DATA)))
        _NODE_DATA[dkey] = _build_node_data(run, node_config, label_names)
    train_enc, eval_enc, stream, private = _NODE_DATA[dkey]
    # The node's own device setting decides; the run's is a request.
    device = devices.node_device(run.compute, str(node_config.get("device", "")))
    devices.check_precision(run.compute, device)
    mkey = _model_key(run, label_names, train_lora_a, device)
    if mkey not in _MODELS:
        if _MODELS:  # a new run in this process: release the previous run's model (and its GPU memory)
            _MODELS.clear()
            devices.release()
        model = build_model(run, num_labels=len(label_names), train_lora_a=train_lora_a, device=device)
        if run.compute.precision == "bf16":
            devices.keep_trainable_fp32(model)
        _MODELS[mkey] = (model, privacy.wrap_model(model) if run.dp.per_sample else None)
    model, dp_model = _MODELS[mkey]
    if (elapsed := time.perf_counter() - start) > 0.5:
        log.info("node %s ready in %.1fs on %s: %d train examples", stream, elapsed, device, len(train_enc))
    precision = (lambda: devices.autocast(run.compute, device)) if run.compute.precision == "bf16" else None
    return NodeRuntime(run, model, train_enc, eval_enc, stream, private, dp_model, precision)


def _build_node_data(run: RunConfig, node_config: dict, label_names: tuple[str, ...]):
    ds, text_columns, cache_key, stream, private = node_dataset(run, node_config, label_names)
    eval_ds = None
    if run.fraction_evaluate > 0:
        if train_size_after_holdout(len(ds), run.train.local_eval_fraction) < 1:
            raise ConfigError("local-eval-fraction", run.train.local_eval_fraction, f"leaves no training data of this node's {len(ds)} examples")
        split = ds.train_test_split(test_size=run.train.local_eval_fraction, seed=run.seed)
        ds, eval_ds = split["train"], split["test"]
        cache_key += f"|holdout{run.train.local_eval_fraction}/{run.seed}"
    d = run.data
    cache_key += f"|{d.label_column}|{label_names}|{d.train_split}|{d.eval_split}"
    if run.task == "causal-lm":
        cache_key += f"|{d.prompt_column}|{d.response_column}|{d.prompt_template}|{d.label_words}"
    tok = _tokenizer(run.model)
    cdir = node_state_dir(run, node_config)
    train_enc = data_mod.encode(ds, tok, text_columns, run.data.max_length, cache_key + "|train", cdir)
    eval_enc = data_mod.encode(eval_ds, tok, text_columns, run.data.max_length, cache_key + "|eval", cdir) if eval_ds is not None else None
    for name, enc in (("training", train_enc), ("evaluation", eval_enc)):
        if enc is not None and enc.dropped:
            # In the node's own log only: how many of its examples are long is not the server's to know.
            log.warning("%d of this node's %s examples do not fit max-length = %d (prompt + response): left out", enc.dropped, name, d.max_length)
    if len(train_enc) == 0:
        raise ConfigError("max-length", d.max_length, "no training example of this node fits (prompt + response)")
    return train_enc, eval_enc, stream, private


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    """One tokenizer per model and process (a process may serve hundreds of simulated nodes)."""
    return load_tokenizer(model)


def train_size_after_holdout(n: int, fraction: float) -> int:
    """Examples left to train on after datasets' train_test_split(test_size=fraction)."""
    return n - math.ceil(fraction * n)


def check_fingerprint(rt: NodeRuntime, expected: str, exchange: wire.Exchange | None = None) -> None:
    mine = wire.fingerprint(rt.model, exchange)
    if mine != expected:
        raise FingerprintMismatch(
            f"this node's shared frozen tensors (LoRA A / frozen head) have fingerprint {mine[:16]}…, "
            f"the run's are {expected[:16]}…: refusing to train. Check that every node runs the same "
            "seed, model checkpoint, lora.* settings and library versions."
        )


def train_round(
    rt: NodeRuntime,
    arrays: ArrayRecord,
    server_round: int,
    ledger: privacy.PrivacyLedger | None,
    progress_prefix: str = "",
    *,
    exchange: wire.Exchange | None = None,
    personal: ArrayRecord | None = None,
) -> tuple[ArrayRecord, dict[str, Any]]:
    """Load the global payload, train ``local-steps`` steps, return the new payload and metrics.

    ``exchange`` says what the server sent and what goes back (default: the
    model's trainable set both ways); ``personal`` is this node's own B
    (FedSA-LoRA; None = zero). With DP, ``ledger`` is checked before and
    updated after (in place)."""
    t0 = time.perf_counter()
    ex = exchange or wire.Exchange.of(rt.model)
    wire.load_down(rt.model, wire.decode(arrays), ex, rt.run.seed, personal)
    cfg, run = rt.run.train, rt.run
    opt = training.make_optimizer(rt.trainable(), cfg, training.round_learning_rate(cfg, server_round, run.num_server_rounds))
    # Simulation (research) runs are reproducible from (seed, round, partition);
    # a node with its own data samples batches from OS entropy, since subsampling
    # amplification assumes the sampler's randomness is secret.
    # Deployed nodes (own data): None = a cryptographically secure generator (privacy.secure_bytes) for the DP sampling and noise.
    sample_gen = None if rt.private else round_generator(run.seed, server_round, rt.stream, 0)
    if not rt.private:
        # Dropout draws from torch's global generator: reseed it per (round, node)
        # so a round does not depend on what this process ran before.
        torch.manual_seed(int(round_generator(run.seed, server_round, rt.stream, 2).initial_seed()))

    def progress(step: int, total: int, loss: float) -> None:
        log.info("%sstep %d/%d loss %.4f", progress_prefix, step, total, loss)

    def clipping(opt: torch.optim.Optimizer, expected: int, noise_gen: torch.Generator | None) -> torch.optim.Optimizer:
        """Per-sample clipping (flat or per group), with the ledger's noise under DP."""
        assert rt.dp_model is not None
        privacy.reset_per_sample_state(rt.dp_model)
        groups = None
        if run.dp.clipping == "per-group":
            groups = [0 if is_head(name) else 1 for name, p in rt.model.named_parameters() if p.requires_grad]  # the order of rt.trainable()
        return drop_nonfinite_examples(
            privacy.dp_optimizer(opt, ledger, run.dp.max_grad_norm, expected, noise_gen, groups, run.dp.group_norms() if groups else None)
        )

    if run.dp.enabled:
        assert ledger is not None
        ledger.check(cfg.local_steps)
        noise_gen = None if rt.private else round_generator(run.seed, server_round, rt.stream, 1)
        dp_opt = clipping(opt, max(1, round(ledger.sample_rate * rt.num_examples)), noise_gen)
        batches = privacy.poisson_batches(rt.num_examples, ledger.sample_rate, cfg.local_steps, sample_gen)
        result = training.train(
            rt.dp_model, rt.train_data, batches, dp_opt, cfg.local_steps, progress, micro_batch_size=cfg.micro_batch_size, precision=rt.precision
        )
        # Every drawn step counts, empty batches included: the accountant assumes them.
        ledger.record(cfg.local_steps)
        epsilon = ledger.epsilon()
    else:
        # Without DP: fixed-size shuffled batches, each sample's gradient clipped
        # (no noise) unless dp.max-grad-norm = 0, then plain steps.
        batches = training.shuffled_batches(rt.num_examples, cfg.batch_size, cfg.local_steps, sample_gen or _entropy_generator())
        ledger = None
        if run.dp.per_sample:
            model, opt = rt.dp_model, clipping(opt, min(cfg.batch_size, rt.num_examples), None)
        else:
            model = rt.model
        result = training.train(model, rt.train_data, batches, opt, cfg.local_steps, progress, micro_batch_size=cfg.micro_batch_size, precision=rt.precision)
        epsilon = 0.0
    payload = wire.to_arrays(rt.model, wire.up_names(rt.model, ex))
    if not all(np.isfinite(payload[k].numpy()).all() for k in payload.keys()):
        # Never sent: whether an update is finite must not depend on which examples were drawn.
        raise NonFiniteUpdate("this round's update has non-finite values: not sent")
    payload = wire.encode(payload, run.wire_dtype)  # rounded after DP: post-processing, no privacy cost
    metrics = {
        "num-examples": rt.num_examples,
        "epsilon": epsilon,
        "steps": result.steps,
        "train-seconds": result.seconds,
        "round-seconds": time.perf_counter() - t0,  # load + train + extract, no setup
        "lora-rank": rt.run.lora.r,
    }
    if not run.dp.enabled:
        # The loss on the private batches is not covered by DP: released only without DP.
        metrics["train-loss"] = result.loss
    return payload, metrics


def evaluate_round(rt: NodeRuntime, arrays: ArrayRecord, *, exchange: wire.Exchange | None = None, personal: ArrayRecord | None = None) -> dict[str, Any]:
    """The global model (with this node's personal B, for FedSA-LoRA) on the node's held-out split."""
    if rt.eval_data is None:
        raise ConfigError("local-eval-fraction", rt.run.train.local_eval_fraction, "this node has no local evaluation split")
    wire.load_down(rt.model, wire.decode(arrays), exchange or wire.Exchange.of(rt.model), rt.run.seed, personal)
    ev = rt.run.eval
    metrics = training.evaluate(
        rt.model, rt.eval_data, rt.run.train.eval_batch_size, precision=rt.precision, generate=ev.generate, max_new_tokens=ev.max_new_tokens
    )
    return {"num-examples": len(rt.eval_data), **metrics}


def plan_ledger(rt: NodeRuntime) -> privacy.PrivacyLedger:
    """A fresh ledger calibrated for this node's data size and the run's schedule."""
    run = rt.run
    return privacy.PrivacyLedger.from_json(_planned(run.dp, rt.num_examples, run.train.batch_size, run.num_server_rounds * run.train.local_steps))


@functools.lru_cache(maxsize=256)
def _planned(dp, num_examples: int, batch_size: int, steps: int) -> str:
    # Calibration takes about a second; a process serving many nodes does it once per distinct size.
    return privacy.PrivacyLedger.plan(dp, num_examples, batch_size, steps).to_json()


def check_ledger(ledger: privacy.PrivacyLedger, planned: privacy.PrivacyLedger) -> None:
    """Refuse a stored ledger that is not this run's plan for this node (a forged
    or stale file: another target, delta, noise, sampling rate, schedule or accountant), or
    whose history records a mechanism other than the planned one."""
    fields = ("target_epsilon", "delta", "noise_multiplier", "sample_rate", "planned_steps")
    differ = [f for f in fields if not math.isclose(float(getattr(ledger, f)), float(getattr(planned, f)), rel_tol=1e-9, abs_tol=0.0)]
    if ledger.accountant != planned.accountant:
        differ.append("accountant")
    foreign = [
        h
        for h in ledger.history
        if not (math.isclose(h[0], planned.noise_multiplier, rel_tol=1e-9) and math.isclose(h[1], planned.sample_rate, rel_tol=1e-9) and int(h[2]) >= 0)
    ]
    if differ or foreign:
        raise LedgerMismatch(
            f"the stored privacy ledger differs from this run's plan for this node ({', '.join(differ) or 'history'}): "
            "refusing to train; remove the ledger only if you know why it differs"
        )


def node_state_dir(run: RunConfig, node_config: dict) -> str:
    """Where this node keeps its token cache and state. A node with its own data
    uses its own ``state-dir`` (owner-only): the server's ``cache-dir`` does not
    apply to it. A simulated node uses the run's ``cache-dir``."""
    if node_config.get("data-path"):
        return private_dir(str(node_config.get("state-dir") or default_state_dir()))
    return cache_dir(run)


def node_key(node_config: dict, node_id: int) -> str:
    """This node's identity across restarts: keys its ledger and personal state."""
    return str(node_config.get("partition-id", node_config.get("data-path", node_id)))


@dataclass
class NodeTask:
    """One train or evaluate message, from this node's side: its runtime, its
    store, what crosses the wire (the method's exchange) and the round."""

    rt: NodeRuntime
    store: NodeStore
    exchange: wire.Exchange
    server_round: int
    node: NodeConfig  # this node's own settings and privacy policy
    node_config: dict  # as given (which policy keys were set)
    name: str = ""  # for log lines

    @classmethod
    def open(cls, run: RunConfig, node_config: dict, node_id: int, config: dict, method) -> NodeTask:
        """The task a message asks for. ``config`` is what the server sent with it;
        ``method`` the strategy class it names (its exchange and rank handling).
        The node's own config is checked first, then its privacy policy against
        the run, before any data is read."""
        node = parse_node_config(node_config)
        policy.check_run(run, node, node_config)
        rt = get_runtime(run, node_config, tuple(config["label-names"]), method.train_lora_a, method.mixed_ranks)
        check_fingerprint(rt, str(config[wire.FINGERPRINT_KEY]), method.exchange)
        store = NodeStore(node_state_dir(run, node_config), str(config["run-key"]), node_key(node_config, node_id))
        name = str(node_config.get("partition-id", node_id))
        return cls(rt, store, method.exchange, int(config["server-round"]), node, dict(node_config), name)

    @property
    def has_personal(self) -> bool:
        return bool(wire.personal_names(self.rt.model, self.exchange))

    def train(self, arrays: ArrayRecord, ledger_in_state: str | None = None) -> tuple[ArrayRecord, dict[str, Any], str | None]:
        """Train this round: (payload, metrics, the ledger as JSON for the node's state, or None)."""
        rt, r = self.rt, self.server_round
        # A repeated round (a resumed run) gets the update this node already sent, not a new one.
        digest = arrays_digest(arrays)
        if (cached := self.store.load_reply(r, digest)) is not None:
            log.info("round %d: sending again the update already sent for this round (no new training, no new privacy cost)", r)
            return cached[0], cached[1], None
        ledger = self._spend_ahead(ledger_in_state) if rt.run.dp.enabled else None
        out, metrics = train_round(
            rt,
            arrays,
            r,
            ledger,
            progress_prefix=f"[node {self.name} round {r}] ",
            exchange=self.exchange,
            personal=self.store.load_personal(r - 1) if self.has_personal else None,
        )
        # The order of writes: ledger (before training), personal state, then the reply.
        # A crash before the reply re-trains (and the ledger, already charged, may refuse);
        # it never replays an update whose steps were not recorded.
        if self.has_personal:
            self.store.save_personal(r, wire.to_arrays(rt.model, wire.personal_names(rt.model, self.exchange)))
        if ledger is not None:
            metrics["noise-multiplier"] = ledger.noise_multiplier
        self.store.save_reply(r, digest, out, metrics)
        return out, metrics, ledger.to_json() if ledger is not None else None

    def _spend_ahead(self, ledger_in_state: str | None) -> privacy.PrivacyLedger:
        """The run's ledger for this node, checked and charged on disk for this
        round's steps BEFORE training (write-ahead), under the ledger's lock."""
        steps = self.rt.run.train.local_steps
        # A node with its own data also charges its data source, across runs (lifetime budget).
        source = SourceLedger(self.store.root, os.path.realpath(self.node.data_path)) if self.node.private else None
        with source.lock() if source else contextlib.nullcontext(), self.store.ledger_lock():
            planned = plan_ledger(self.rt)
            # Keyed by the run (survives a resumed run) and this node's identity.
            ledger = self.store.load_ledger(ledger_in_state)
            if ledger is None:
                ledger = planned
            else:
                check_ledger(ledger, planned)
            if source:
                policy.check_lifetime(self.node, source.other_runs(self.store.run_key), planned)
            ledger.check(steps)
            ahead = privacy.PrivacyLedger.from_json(ledger.to_json())
            ahead.record(steps)
            self.store.save_ledger(ahead)
            if source:
                source.record(self.store.run_key, ahead.history)
        return ledger  # train_round checks and records the same steps in memory

    def evaluate(self, arrays: ArrayRecord) -> dict[str, Any]:
        """The global model (with this node's personal tensors) on the node's held-out split."""
        if policy_binds(self.node, self.node_config):
            policy.check_eval(self.node, self.node_config, 0)  # allowed at all?
            policy.check_eval(self.node, self.node_config, self.store.count_eval())
        personal = self.store.load_personal(self.server_round) if self.has_personal else None
        return evaluate_round(self.rt, arrays, exchange=self.exchange, personal=personal)
