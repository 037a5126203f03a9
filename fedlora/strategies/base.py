"""The federated LoRA strategy base: FedAvg over exactly the payload a method
sends, with byte counting, a shared-init fingerprint, and per-round stats.
A strategy is one subclass in one module of this package; see ``FedLoraStrategy``."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from .. import validation, wire
from ..config import AGGREGATIONS, STRATEGY_REGISTRY, ConfigError, WireDType
from ..user_dp import UserDP

log = logging.getLogger("fedlora")

WIRE_DTYPES = tuple(str(d) for d in WireDType)


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
    user_epsilon: float | None = None  # user-level (central) DP spent so far; None = no user-level DP
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
    """FedAvg restricted to a method's payload; the base of every federated LoRA method.

    The payload (keys and shapes) is fixed at start: a reply with other tensors
    is refused, which is how FFA-LoRA guarantees that no A tensor is ever
    aggregated. Every reply passes ``fedlora.validation`` first; a refused reply
    is logged with its node and reason, and the round aggregates the rest if at
    least ``min_replies`` remain.

    **Adding a method** takes one new module in ``fedlora/strategies/`` with one
    subclass: the class registers itself under its ``name`` (``__init_subclass__``
    -> ``config.STRATEGY_REGISTRY``, which is also the ``strategy`` key's choices),
    and the package imports every module in it, so nothing else is edited
    (regenerate docs/CONFIGURATION.md, which lists the choices).

    Class attributes a subclass sets (the defaults are vanilla LoRA's):

    - ``name``: the run config's ``strategy`` value; unique (a second class under a
      name is an error). A subclass that does not set it is not registered.
    - ``exchange``: a ``wire.Exchange``: what clients train (``train_a``), what the
      server sends down and what clients send up, whether factors restart each
      round, whether a base-weight update is kept. ``train_lora_a`` is set from it.
    - ``exact_aggregation``: whether the new global model is exactly the clients'
      example-weighted mean model (reported, and documented per method).
    - ``robust_ok``: False if the method's math needs the example-weighted mean
      (``aggregation.method`` other than ``mean`` is then refused at start).
    - ``mixed_ranks``: how replies of a lower LoRA rank are aggregated:
      ``"zero-padding"`` (padded to the global rank here), ``"stacking"``, or
      ``""`` (refused: every node must have rank ``lora.r``).
    - ``user_dp_ok``: False if what the server releases is not the (noised) mean
      of the updates, so user-level DP cannot bound it (refused at start).
    - ``merge_needs_start``: what ``merge_state`` reads of the round's starting
      state ``self.current`` (e.g. ``"the round's A"``), for the error when there
      is none (no ``configure_train`` before); ``""``: nothing, and without a
      start the merge is over the aggregate alone.

    A round: ``configure_train`` sends ``down_arrays`` of the global state,
    rounded to ``wire_dtype`` (the state itself stays float32); every reply is
    decoded to float32 first (``wire.decode``; an unreadable one is refused);
    ``aggregate_train`` screens the replies (``_screen``), accounts for them
    (``_account``: bytes, metrics, privacy spent), aggregates what passed
    (``_aggregate``: update clipping, then user-level DP, FedAvg or the robust
    aggregator) and returns ``merge``'s new global state.

    ``merge(aggregated, replies) -> ArrayRecord`` takes the aggregated payload
    (an ``ArrayRecord`` of the payload keys, at the global rank) and the
    validated replies (``RecordDict``s, in a fixed order, lower ranks padded) and
    returns the new global state: the round's start ``self.current`` with the
    aggregated tensors replaced. Subclasses do not override it; a method that
    does more implements the hook ``merge_state(state, aggregated, replies)``,
    which changes ``state`` (key -> numpy array: the start with the aggregate)
    in place, e.g. folding a base-weight update into it (``wire.add_base_delta``);
    every array is then stored as float32. Helpers: ``weighted_replies`` (example
    weights and float64 factors per reply) and ``factor_keys`` (the (A, B) key
    pairs). Other hooks: ``down_arrays`` (what the server sends), ``state`` and
    ``load_state`` (what a checkpoint keeps besides the arrays).
    """

    name = ""
    exchange = wire.Exchange()  # what clients train, and what crosses the network each way
    train_lora_a = True  # = exchange.train_a (set for every subclass)
    exact_aggregation = False  # mean of the factors == mean of the products?
    robust_ok = True  # False: the method's math needs the example-weighted mean
    mixed_ranks = "zero-padding"  # how replies of a lower rank are aggregated ("" = refused)
    user_dp_ok = True  # False: what the server releases is not the (noised) mean of the updates
    merge_needs_start = ""  # what merge_state reads of self.current (the round's start); "" = nothing

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.train_lora_a = cls.exchange.train_a
        if cls.__dict__.get("name"):  # declared by this class, not inherited
            STRATEGY_REGISTRY.register(cls.name, cls)

    def __init__(
        self,
        *,
        payload_shapes: dict[str, tuple[int, ...]],
        fingerprint: str,
        extra_config: dict | None = None,
        min_replies: int = 1,
        max_norm_ratio: float = 0.0,
        max_weight_share: float = 1.0,
        aggregation: str = "mean",
        trim_fraction: float = 0.2,
        clip_norm: float = 0.0,
        down_keys: Iterable[str] | None = None,
        lora_scale: float = 1.0,
        user_dp: UserDP | None = None,
        wire_dtype: str = "float32",
        update_bound: validation.UpdateBound | None = None,
        **kwargs,
    ) -> None:
        """A strategy for one run; keyword arguments not listed go to Flower's ``FedAvg``.

        Parameters
        ----------
        payload_shapes : dict
            Key -> shape of every tensor a reply carries.
        fingerprint : str
            The run's shared frozen tensors (``wire.fingerprint``), sent with every message.
        wire_dtype : str
            ``wire.dtype``: what the arrays sent are rounded to (float32, float16, bfloat16).
        update_bound : validation.UpdateBound, optional
            The run's local training (``UpdateBound.from_run``): with fewer replies than a
            median needs, each update is also screened against the most an honest node's
            training can move. None: only the medians screen.

        The other parameters mirror the run config's keys (``validate.*``, ``aggregation.*``,
        ``lora.*``, ``user-dp.*``)."""
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
        super().__init__(**kwargs)
        # Robust options reuse Flower's own aggregators on the validated replies:
        # coordinate-wise median (FedMedian) or trimmed mean (FedTrimmedAvg), unweighted.
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if aggregation != "mean" and not self.robust_ok:
            raise ConfigError("aggregation.method", aggregation, f"strategy {self.name} needs 'mean' (its exact aggregation is defined for the weighted mean)")
        metric_fn = kwargs["train_metrics_aggr_fn"]
        self.aggregation = aggregation
        self._robust: FedAvg | None = None
        if aggregation == "median":
            self._robust = FedMedian(train_metrics_aggr_fn=metric_fn)
        elif aggregation == "trimmed-mean":
            self._robust = FedTrimmedAvg(beta=trim_fraction, train_metrics_aggr_fn=metric_fn)
        self.clip_norm = clip_norm
        self.payload_shapes = {k: tuple(v) for k, v in payload_shapes.items()}  # what a reply carries
        self.payload_keys = frozenset(self.payload_shapes)
        self.down_keys = frozenset(self.payload_keys if down_keys is None else down_keys)  # what the server sends
        self.lora_scale = lora_scale  # PEFT's alpha / r: the layer adds lora_scale * B A x
        self.current: ArrayRecord | None = None  # the global state this round started from
        self._up_bytes: dict[int, int] = {}  # node -> bytes of its reply as received (before any padding)
        self._refs: dict[int, dict[str, np.ndarray]] = {}  # node -> where its update starts (validation.reference)
        self.user_dp = user_dp
        if user_dp is not None:
            if not self.user_dp_ok:
                raise ConfigError(
                    "user-dp.mode",
                    user_dp.mode,
                    f"strategy {self.name} releases a base-weight update, a product of each client's "
                    "factors that update clipping does not bound: no user-level DP",
                )
            if aggregation != "mean":
                raise ConfigError("aggregation.method", aggregation, "user-level DP needs 'mean' (its noise is calibrated for the mean of clipped updates)")
            if user_dp.mode == "client-fixed" and wire_dtype != "float32":
                # The mod computes reply - received on the arrays as they travel (bfloat16 as raw bits).
                raise ConfigError(
                    "wire.dtype", wire_dtype, "Flower's fixedclipping_mod clips the arrays as they travel: use float32 with user-dp.mode = client-fixed"
                )
            if user_dp.mode == "client-fixed" and self.down_keys != self.payload_keys:
                raise ConfigError(
                    "user-dp.mode",
                    user_dp.mode,
                    f"Flower's fixedclipping_mod needs a reply with the tensors it received; strategy {self.name} sends others: use server-fixed",
                )
        self.wire_dtype = str(wire_dtype)
        self.update_bound = update_bound if update_bound is not None and update_bound.bounded else None
        self._formats: dict[int, set[str]] = {}  # node -> the wire formats its reply travelled in
        self.min_replies = min_replies
        self.max_norm_ratio = max_norm_ratio
        self.max_weight_share = max_weight_share  # no reply's example count weighs more than this share
        self.accepted_norms: list[float] = []  # update norms that passed screening, latest last
        self._sent: dict[int, tuple[set[int], dict]] = {}  # round -> (selected nodes, arrays sent)
        self._sent_msgs: list[Message] = []  # this round's train messages (the grid sets their ids when it pushes them)
        self.fingerprint = fingerprint
        self.extra_config = dict(extra_config or {})
        self.rounds: dict[int, RoundStats] = {}
        self.spent: dict[int, float] = {}  # node -> latest epsilon it reported (cumulative)

    def summary(self) -> None:
        super().summary()
        log.info("\t└──> fedlora: %s, %d tensors per payload, exact aggregation: %s", self.name, len(self.payload_keys), self.exact_aggregation)

    def _with_run_config(self, config: ConfigRecord) -> ConfigRecord:
        config[wire.STRATEGY_KEY] = self.name
        config[wire.FINGERPRINT_KEY] = self.fingerprint
        for k, v in self.extra_config.items():
            config[k] = v
        return config

    def down_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """What the server sends of its global state: the method's tensors and any base delta."""
        return ArrayRecord({k: arrays[k] for k in arrays if k in self.down_keys or wire.is_delta(k)})

    def configure_train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
    ) -> Iterable[Message]:
        stats = self.rounds[server_round] = RoundStats()
        self.current = arrays
        down = wire.encode(self.down_arrays(arrays), self.wire_dtype)  # as it travels
        config = self._with_run_config(config)
        if self.user_dp is not None:
            self.user_dp.configure(config)
        messages = list(super().configure_train(server_round, down, config, grid))
        if self.user_dp is not None and len(messages) != self.user_dp.num_sampled:
            raise RuntimeError(f"user-level DP is calibrated for {self.user_dp.num_sampled} clients per round, {len(messages)} were sampled")
        stats.sampled = len(messages)
        stats.bytes_down = wire.nbytes(down) * len(messages)
        # A reply's update is relative to where its node started: the values of the reply's keys
        # as the node decodes them (rounded to wire.dtype), or, for what is not sent (FLoRA's
        # restarted factors), the global state's, which the node re-draws exactly.
        received = wire.decode(down)
        start = {k: (received if k in received else arrays)[k].numpy() for k in arrays if k in self.payload_keys}  # in the state's (fixed) order
        self._sent = {server_round: ({m.metadata.dst_node_id for m in messages}, start)}
        self._sent_msgs = messages
        return messages

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
    ) -> Iterable[Message]:
        down = wire.encode(self.down_arrays(arrays), self.wire_dtype)
        messages = list(super().configure_evaluate(server_round, down, self._with_run_config(config), grid))
        if server_round in self.rounds:
            self.rounds[server_round].bytes_down += wire.nbytes(down) * len(messages)
        return messages

    def _refuse(self, stats: RoundStats, node: int, reason: str) -> None:
        stats.failures.append(f"node {node}: {reason}")

    def _valid_replies(self, server_round: int, replies: list[Message], stats: RoundStats) -> list[Message]:
        selected, sent = self._sent.get(server_round, (None, None))
        good, self._up_bytes, self._refs, self._formats = [], {}, {}, {}
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent_msgs if m.metadata.message_id}
        heard = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() and selected is not None and node not in selected:
                # The SuperLink answers for a node that left: name that node.
                node = to_node.get(msg.metadata.reply_to_message_id, node)
            if node in heard:  # counted once: a second reply would double a node's weight (and its DP sensitivity)
                self._refuse(stats, node, "more than one reply this round (the first is used)")
                continue
            heard.add(node)
            if msg.has_error():
                self._refuse(stats, node, msg.error.reason)
            elif selected is not None and node not in selected:
                self._refuse(stats, node, "not selected for this round")
            elif isinstance(travelled := self._decode(msg.content, node), str):
                self._refuse(stats, node, travelled)
            elif reason := validation.check_reply(msg.content, self.payload_shapes, flexible_rank=self._flexible_rank):
                self._refuse(stats, node, reason)
            else:
                self._up_bytes[node] = travelled  # as received: before any padding
                if sent is not None:  # before padding: a lower-rank node's update is on its own rank
                    self._refs[node] = validation.reference(msg.content, sent)
                self._pad_ranks(msg.content)
                good.append(msg)
        for node in sorted((selected or set()) - heard):
            self._refuse(stats, node, "no reply within round-timeout (the node left, or is too slow)")
        # Under user-level DP the clip bounds each client's influence; screening by
        # norm would make the release depend on unnoised norms (and publish them).
        if sent is not None and self.user_dp is None:
            norms = {m.metadata.src_node_id: validation.update_norm(m.content, self._refs[m.metadata.src_node_id]) for m in good}
            bounds: dict[int, tuple[float, str]] = {}
            if len(good) < validation.MIN_REPLIES_FOR_NORM_CHECK and self.max_norm_ratio > 0:
                # No round median: also the most an honest node's training can move.
                bounds, refused = self._honest_bounds(good)
                for node, reason in refused.items():
                    self._refuse(stats, node, reason)
                good = [m for m in good if m.metadata.src_node_id not in refused]
                norms = {node: n for node, n in norms.items() if node not in refused}
            outliers = validation.norm_outliers(norms, self.max_norm_ratio, self.accepted_norms, bounds)
            for node, reason in outliers.items():
                self._refuse(stats, node, reason)
            good = [m for m in good if m.metadata.src_node_id not in outliers]
            # The reference for later rounds with fewer replies than a median needs.
            self.accepted_norms = (self.accepted_norms + [n for node, n in norms.items() if node not in outliers])[-50:]
        # A fixed order, by content: float sums then do not depend on arrival
        # order, so a resumed seeded run ends exactly where an uninterrupted one does.
        return sorted(good, key=_content_digest)

    def _decode(self, content: RecordDict, node: int) -> int | str:
        """Decode a reply's arrays to float32 in place, before any check reads them;
        return the bytes they travelled as, or why they cannot be read."""
        sender = f"node {node}"
        try:
            travelled = sum(wire.nbytes(r) for r in content.array_records.values())
            formats = {str(a.dtype) for r in content.array_records.values() for a in r.values()}
            for name, record in list(content.array_records.items()):
                content[name] = wire.decode(record, sender=sender)
        except wire.PayloadError as e:
            return str(e)
        except (ValueError, TypeError, KeyError, EOFError, OSError) as e:  # np.load of arbitrary bytes
            return f"payload from {sender} cannot be read as arrays ({type(e).__name__}: {e})"
        self._formats[node] = formats
        return travelled

    def _honest_bounds(self, good: list[Message]) -> tuple[dict[int, tuple[float, str]], dict[int, str]]:
        """Per node, the most its update can move if it trained as the run says
        (``validation.UpdateBound.limit``, on its claimed example count and
        reported noise), and the nodes whose claims no honest node makes."""
        bounds: dict[int, tuple[float, str]] = {}
        refused: dict[int, str] = {}
        if self.update_bound is None:
            return bounds, refused
        values = sum(int(np.prod(shape)) for shape in self.payload_shapes.values())  # at the global rank: >= any node's
        for m in good:
            node = m.metadata.src_node_id
            record, metrics = next(iter(m.content.array_records.values())), next(iter(m.content.metric_records.values()))
            ref = self._refs[node]
            start_norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in ref.values())))
            reply_norm = float(np.sqrt(sum(float(np.sum(np.square(record[k].numpy(), dtype=np.float64))) for k in ref)))
            formats = self._formats.get(node, set())
            try:
                bound = self.update_bound.limit(
                    values,
                    int(metrics[self.weighted_by_key]),
                    metrics.get("noise-multiplier"),
                    roundoff=max((validation.ROUNDOFF.get(f, 0.0) for f in formats), default=0.0),
                    start_norm=start_norm,
                    reply_norm=reply_norm,
                    tiny=validation.FP16_TINY if "float16" in formats else 0.0,
                )
            except ConfigError as e:  # no noise multiplier reaches the budget for the claimed count
                refused[node] = f"claims {metrics[self.weighted_by_key]} examples, for which no node can train under this run's DP ({e})"
                continue
            if bound is not None:
                bounds[node] = bound
        return bounds, refused

    @property
    def _flexible_rank(self) -> bool:
        """Whether lower-rank replies are taken: not under client-side clipping,
        which clips against what the node received (a rank it did not keep)."""
        return bool(self.mixed_ranks) and not (self.user_dp is not None and self.user_dp.mode == "client-fixed")

    def _pad_ranks(self, content: RecordDict) -> None:
        """A lower-rank reply (heterogeneous ranks; HetLoRA's zero-padding, Cho et al., EMNLP 2024)
        is zero-padded to the global rank, in place: zero rows of A and columns of B,
        so each client's product B A is unchanged."""
        record = next(iter(content.array_records.values()))
        for key, expected in self.payload_shapes.items():
            value = record[key].numpy()
            if value.shape != tuple(expected):
                padded = np.zeros(expected, np.float32)
                padded[: value.shape[0], : value.shape[1]] = value
                record[key] = Array(padded)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, account for them, aggregate those that passed, merge into the new global state."""
        stats = self.rounds.setdefault(server_round, RoundStats())
        good = self._screen(server_round, list(replies), stats)
        self._account(good, stats)
        arrays, metrics = self._aggregate(server_round, good, stats)
        if arrays is not None:
            arrays = self.merge(arrays, [m.content for m in good])
        return arrays, metrics

    def _screen(self, server_round: int, replies: list[Message], stats: RoundStats) -> list[Message]:
        """The replies this round aggregates: the valid ones, or none when too few are."""
        good = self._valid_replies(server_round, replies, stats)
        for failure in stats.failures:
            log.warning("round %d: refused reply from %s", server_round, failure)
        if len(good) < self.min_replies:
            log.warning("round %d: %d valid replies, fewer than min-replies=%d: the global adapter is kept", server_round, len(good), self.min_replies)
            return []
        if self.user_dp is not None and good and len(good) != self.user_dp.num_sampled:
            # The noise is calibrated for the mean of exactly num_sampled clipped updates.
            stats.failures.append(f"user-level DP: {len(good)} valid replies of {self.user_dp.num_sampled} sampled; the global adapter is kept")
            log.warning("round %d: %s", server_round, stats.failures[-1])
            return []
        return good

    def _account(self, good: list[Message], stats: RoundStats) -> None:
        """Bytes up, each client's metrics and the privacy spent, into the round's stats."""
        stats.replies = len(good)
        for m in good:
            stats.bytes_up += self._up_bytes.pop(m.metadata.src_node_id)
            metrics = dict(next(iter(m.content.metric_records.values())))
            stats.client_metrics[m.metadata.src_node_id] = metrics
            node = m.metadata.src_node_id
            self.spent[node] = max(self.spent.get(node, 0.0), float(metrics.get("epsilon", 0.0)))
        # Privacy spent so far: the max over every node that ever trained, not only this round's.
        stats.epsilon = max(self.spent.values(), default=0.0)

    def _aggregate(
        self,
        server_round: int,
        good: list[Message],
        stats: RoundStats,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregated payload and metrics of ``good`` ((None, None) when empty)."""
        if not good:
            if self.user_dp is not None:
                stats.user_epsilon = self.user_dp.epsilon()
            return None, None
        self._clip_updates(server_round, good)
        self._cap_weights(good)
        if self.user_dp is not None:
            start = self._sent[server_round][1]
            starts = [self._refs[m.metadata.src_node_id] for m in good]
            arrays = self.user_dp.aggregate(server_round, [m.content for m in good], start, starts)
            metrics = self.train_metrics_aggr_fn([m.content for m in good], self.weighted_by_key)
            stats.user_epsilon = self.user_dp.epsilon()
            return arrays, metrics
        aggregate = self._robust.aggregate_train if self._robust is not None else super().aggregate_train
        return aggregate(server_round, good)

    def _cap_weights(self, good: list[Message]) -> None:
        """``aggregation.max-weight-share``: each reply's weight (its claimed example
        count, already recorded in the round's stats) becomes its capped share."""
        if self.max_weight_share >= 1.0:
            return
        records = [next(iter(m.content.metric_records.values())) for m in good]
        shares = validation.capped_shares([float(r[self.weighted_by_key]) for r in records], self.max_weight_share)
        for record, share in zip(records, shares):
            record[self.weighted_by_key] = share

    def _clip_updates(self, server_round: int, good: list[Message]) -> None:
        """``aggregation.clip-norm``: each update (reply - where its node started) clipped in place."""
        if self.clip_norm > 0 and self._sent.get(server_round, (None, None))[1] is not None:
            for m in good:
                if (scale := validation.clip_update(m.content, self._refs[m.metadata.src_node_id], self.clip_norm)) < 1:
                    log.info("round %d: node %d's update clipped (x%.3g)", server_round, m.metadata.src_node_id, scale)

    def state(self) -> dict:
        """What a checkpoint must keep besides the global arrays."""
        state: dict = {"accepted-norms": self.accepted_norms} if self.accepted_norms else {}
        if self.user_dp is not None:
            state["user-dp"] = self.user_dp.state()
        return state

    def load_state(self, state: dict) -> None:
        self.accepted_norms = [float(n) for n in state.get("accepted-norms", [])]
        if self.user_dp is not None and "user-dp" in state:
            self.user_dp.load_state(state["user-dp"])

    def merge(self, aggregated: ArrayRecord, replies: list[RecordDict]) -> ArrayRecord:
        """The new global state from the aggregated payload and the replies it
        came from: the round's start with the aggregated tensors replaced, then,
        for a method with a ``merge_state`` hook, what the hook makes of it, as
        float32. Subclasses implement the hook, not this."""
        if self.current is None:
            if self.merge_needs_start:
                raise RuntimeError(f"{self.name}: merge needs {self.merge_needs_start} (configure_train first)")
            merged = aggregated
        else:
            start = {k: self.current[k] for k in self.current}
            merged = ArrayRecord({**start, **{k: aggregated[k] for k in aggregated}})
        if type(self).merge_state is FedLoraStrategy.merge_state:  # no hook: the tensors as aggregated
            return merged
        state = {k: v.numpy() for k, v in merged.items()}
        self.merge_state(state, aggregated, replies)
        return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})

    def merge_state(self, state: dict[str, np.ndarray], aggregated: ArrayRecord, replies: list[RecordDict]) -> None:
        """Hook: change the merged ``state`` (key -> array) in place; see ``merge``."""

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None and server_round in self.rounds:
            self.rounds[server_round].client_eval = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
        return metrics


def weighted_replies(replies: list[RecordDict], weight_key: str = validation.WEIGHT_KEY) -> list[tuple[float, dict]]:
    """(example weight n_k / sum n, {key: float64 array}) per reply, in the given order."""
    records = [(next(iter(r.metric_records.values())), next(iter(r.array_records.values()))) for r in replies]
    total = sum(float(m[weight_key]) for m, _ in records)
    return [(float(m[weight_key]) / total, {k: np.asarray(a.numpy(), np.float64) for k, a in arrays.items()}) for m, arrays in records]


def factor_keys(keys) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA layer among ``keys``."""
    return [(k, k.replace(".lora_A.", ".lora_B.")) for k in sorted(keys) if ".lora_A." in k]
