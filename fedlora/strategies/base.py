"""The federated LoRA strategy base: FedAvg over exactly the payload a method
sends, with byte counting, a shared-init fingerprint, and per-round stats."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from .. import validation, wire
from ..config import AGGREGATIONS

log = logging.getLogger("fedlora")

# Config keys the server sends with every train/evaluate message.
FINGERPRINT_KEY = "shared-fingerprint"
STRATEGY_KEY = "strategy"


@dataclass
class RoundStats:
    """What one round moved and reported, for metrics.jsonl."""

    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    sampled: int = 0
    replies: int = 0
    failures: list[str] = field(default_factory=list)
    epsilon: float = 0.0  # max over clients of the epsilon spent so far
    client_metrics: dict[int, dict] = field(default_factory=dict)
    client_eval: dict[str, float] = field(default_factory=dict)  # example-weighted, from evaluate replies


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted means, except privacy spent: the max over clients."""
    total = sum(float(next(iter(r.metric_records.values()))[weight_key]) for r in records)
    out: dict[str, float] = {}
    for r in records:
        m = next(iter(r.metric_records.values()))
        w = float(m[weight_key]) / total
        for k, v in m.items():
            if k == weight_key or isinstance(v, list):
                continue
            if k == "epsilon":
                out[k] = max(out.get(k, 0.0), float(v))
            else:
                out[k] = out.get(k, 0.0) + w * float(v)
    out[weight_key] = total
    return MetricRecord(out)


def _content_digest(msg: Message) -> str:
    h = hashlib.sha256()
    record = next(iter(msg.content.array_records.values()))
    for key in sorted(record.keys()):
        h.update(key.encode())
        h.update(record[key].data)
    return h.hexdigest()


class FedLoraStrategy(FedAvg):
    """FedAvg restricted to a method's payload.

    Subclasses set ``name`` and ``train_lora_a`` (whether LoRA A is trained
    and therefore sent). The payload (keys and shapes) is fixed at start: a
    reply with other tensors is refused, which is how FFA-LoRA guarantees that
    no A tensor is ever aggregated. Every reply passes ``fedlora.validation``
    first; a refused reply is logged with its node and reason, and the round
    aggregates the rest if at least ``min_replies`` remain.
    """

    name = ""
    train_lora_a = True
    exact_aggregation = False  # mean of the factors == mean of the products?

    def __init__(
        self, *, payload_shapes: dict[str, tuple[int, ...]], fingerprint: str, extra_config: dict | None = None,
        min_replies: int = 1, max_norm_ratio: float = 0.0,
        aggregation: str = "mean", trim_fraction: float = 0.2, clip_norm: float = 0.0, **kwargs,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        super().__init__(**kwargs)
        # Robust options reuse Flower's own aggregators on the validated replies:
        # coordinate-wise median (FedMedian) or trimmed mean (FedTrimmedAvg), unweighted.
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        metric_fn = kwargs["train_metrics_aggr_fn"]
        self.aggregation = aggregation
        self._robust: FedAvg | None = None
        if aggregation == "median":
            self._robust = FedMedian(train_metrics_aggr_fn=metric_fn)
        elif aggregation == "trimmed-mean":
            self._robust = FedTrimmedAvg(beta=trim_fraction, train_metrics_aggr_fn=metric_fn)
        self.clip_norm = clip_norm
        self.payload_shapes = {k: tuple(v) for k, v in payload_shapes.items()}
        self.payload_keys = frozenset(self.payload_shapes)
        self.min_replies = min_replies
        self.max_norm_ratio = max_norm_ratio
        self._sent: dict[int, tuple[set[int], dict]] = {}  # round -> (selected nodes, arrays sent)
        self.fingerprint = fingerprint
        self.extra_config = dict(extra_config or {})
        self.rounds: dict[int, RoundStats] = {}
        self.spent: dict[int, float] = {}  # node -> latest epsilon it reported (cumulative)

    def summary(self) -> None:
        super().summary()
        log.info("\t└──> fedlora: %s, %d tensors per payload, exact aggregation: %s",
                 self.name, len(self.payload_keys), self.exact_aggregation)

    def _with_run_config(self, config: ConfigRecord) -> ConfigRecord:
        config[STRATEGY_KEY] = self.name
        config[FINGERPRINT_KEY] = self.fingerprint
        for k, v in self.extra_config.items():
            config[k] = v
        return config

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        stats = self.rounds[server_round] = RoundStats()
        messages = list(super().configure_train(server_round, arrays, self._with_run_config(config), grid))
        stats.sampled = len(messages)
        stats.bytes_down = wire.nbytes(arrays) * len(messages)
        self._sent = {server_round: ({m.metadata.dst_node_id for m in messages}, {k: v.numpy() for k, v in arrays.items()})}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, self._with_run_config(config), grid))
        if server_round in self.rounds:
            self.rounds[server_round].bytes_down += wire.nbytes(arrays) * len(messages)
        return messages

    def _refuse(self, stats: RoundStats, node: int, reason: str) -> None:
        stats.failures.append(f"node {node}: {reason}")

    def _valid_replies(self, server_round: int, replies: list[Message], stats: RoundStats) -> list[Message]:
        selected, sent = self._sent.get(server_round, (None, None))
        good = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self._refuse(stats, node, msg.error.reason)
            elif selected is not None and node not in selected:
                self._refuse(stats, node, "not selected for this round")
            elif reason := validation.check_reply(msg.content, self.payload_shapes):
                self._refuse(stats, node, reason)
            else:
                good.append(msg)
        if sent is not None:
            norms = {m.metadata.src_node_id: validation.update_norm(m.content, sent) for m in good}
            outliers = validation.norm_outliers(norms, self.max_norm_ratio)
            for node, reason in outliers.items():
                self._refuse(stats, node, reason)
            good = [m for m in good if m.metadata.src_node_id not in outliers]
        # A fixed order, by content: float sums then do not depend on arrival
        # order, so a resumed seeded run ends exactly where an uninterrupted one does.
        return sorted(good, key=_content_digest)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        good = self._valid_replies(server_round, list(replies), stats)
        for failure in stats.failures:
            log.warning("round %d: refused reply from %s", server_round, failure)
        if len(good) < self.min_replies:
            log.warning("round %d: %d valid replies, fewer than min-replies=%d: the global adapter is kept",
                        server_round, len(good), self.min_replies)
            good = []
        stats.replies = len(good)
        for m in good:
            stats.bytes_up += sum(wire.nbytes(r) for r in m.content.array_records.values())
            metrics = dict(next(iter(m.content.metric_records.values())))
            stats.client_metrics[m.metadata.src_node_id] = metrics
            node = m.metadata.src_node_id
            self.spent[node] = max(self.spent.get(node, 0.0), float(metrics.get("epsilon", 0.0)))
        # Privacy spent so far: the max over every node that ever trained, not only this round's.
        stats.epsilon = max(self.spent.values(), default=0.0)
        if not good:
            return None, None
        if self.clip_norm > 0 and (sent := self._sent.get(server_round, (None, None))[1]) is not None:
            for m in good:
                if (scale := validation.clip_update(m.content, sent, self.clip_norm)) < 1:
                    log.info("round %d: node %d's update clipped (x%.3g)", server_round, m.metadata.src_node_id, scale)
        if self._robust is not None:
            return self._robust.aggregate_train(server_round, good)
        return super().aggregate_train(server_round, good)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and server_round in self.rounds:
            self.rounds[server_round].client_eval = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
        return metrics
