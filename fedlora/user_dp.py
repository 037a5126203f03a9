"""User-level (client-level) central DP on top of a strategy, with Flower's DP
wrappers, and its accountant.

Each round the server releases the unweighted mean of the sampled clients'
updates, each clipped to L2 norm C, plus Gaussian noise of std z C / m (m
clients sampled). Modes: ``client-fixed`` (clients clip with Flower's
``fixedclipping_mod``; Flower's ``DifferentialPrivacyClientSideFixedClipping``
averages and adds the noise), ``server-fixed`` (the server clips, with
``validation.clip_update``, the same FlatClip as Flower's server-side wrapper,
which divides by zero on an all-zero update; then the same Flower wrapper), and
``server-adaptive`` (Flower's ``DifferentialPrivacyServerSideAdaptiveClipping``,
Andrew et al., 2021: C follows a quantile of the update norms; the noisy
clipped count costs privacy too, and Flower splits z so that the pair is
equivalent to one Gaussian mechanism of multiplier z). The wrappers wrap a
plain ``FedAvg`` that averages the validated payloads *before* the method's own
merge (FedSVD's SVD, FedSA-LoRA's state), so the method's outputs are
post-processing. The noise is drawn from numpy's global generator (Flower's
code), not a cryptographically secure one.

The accountant: with zero-out adjacency (one client's update replaced by
zero), the sum of clipped updates has sensitivity C (a lower-rank node's
update is taken on the rows and columns it trained: ``aggregate``), and every
released round is a Gaussian mechanism of multiplier z; ``user_epsilon``
composes them with Opacus' RDP accountant. Flower samples a fixed-size subset
of clients, not a Poisson sample, so no amplification by sampling is claimed
(sample rate 1, which bounds the subsampled mechanism too); ``user_epsilon``
takes a sample rate only for callers whose client sampling is Poisson.

Not covered: FedEx-LoRA's and FLoRA's base update, a product of each client's
factors whose sensitivity the update clip does not bound (refused), and
example weights (the mean is unweighted under user-level DP).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAvg,
)

from . import validation
from .config import USER_DP_MODES, ConfigError
from .privacy import epsilon_of, secure_gaussian

log = logging.getLogger("fedlora")

MODES = USER_DP_MODES
KEY_CLIPPING_NORM = "clipping_norm"  # the config key Flower's fixedclipping_mod reads
UNIT_WEIGHT = "unit-weight"


def user_epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """Epsilon after ``rounds`` Gaussian releases of multiplier z, by Opacus' RDP accountant
    (``privacy.epsilon_of``: its result to the bit)."""
    if rounds <= 0:
        return 0.0
    return epsilon_of([(noise_multiplier, sample_rate, rounds)], delta)


def client_mod(msg: Message, context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` for train messages that carry a clipping
    norm (user-dp.mode = client-fixed); other messages pass through."""
    config = next(iter(msg.content.config_records.values()), None)
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


class _AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower 1.42 passes the noisy fraction of *clipped* updates to its geometric
    update, so C shrinks when most updates are clipped. Andrew et al. (2021)
    update with the fraction of *unclipped* ones: C <- C exp(-lr (b - target))."""

    def _geometric_update(self, clipped_fraction: float) -> None:
        super()._geometric_update(1.0 - clipped_fraction)


class UserDP:
    """One run's central DP: the wrapped aggregator and the count of releases."""

    def __init__(self, mode: str, noise_multiplier: float, clip_norm: float, delta: float, num_sampled: int, clipped_count_stddev: float = 0.0) -> None:
        self.mode, self.noise_multiplier, self.delta, self.num_sampled = mode, noise_multiplier, delta, num_sampled
        self.releases = 0
        mean = FedAvg(weighted_by_key=UNIT_WEIGHT)
        if mode in ("server-fixed", "client-fixed"):
            self.wrapper = DifferentialPrivacyClientSideFixedClipping(mean, noise_multiplier, clip_norm, num_sampled)
        elif mode == "server-adaptive":
            try:
                self.wrapper = _AdaptiveClipping(
                    mean,
                    noise_multiplier,
                    num_sampled,
                    initial_clipping_norm=clip_norm,
                    clipped_count_stddev=clipped_count_stddev or None,
                )
            except ValueError as e:
                raise ConfigError("user-dp.clipped-count-stddev", clipped_count_stddev, str(e)) from e
        else:
            raise ConfigError("user-dp.mode", mode, f"must be one of {', '.join(MODES[1:])} here")

    @property
    def clip_norm(self) -> float:
        return float(self.wrapper.clipping_norm)

    def configure(self, config: ConfigRecord) -> None:
        """Tell the clients the clipping norm (client-side clipping)."""
        if self.mode == "client-fixed":
            config[KEY_CLIPPING_NORM] = self.clip_norm

    def aggregate(
        self, server_round: int, replies: list[RecordDict], start: dict[str, np.ndarray], starts: list[dict[str, np.ndarray]] | None = None
    ) -> ArrayRecord:
        """Clip (server-side modes), average unweighted, add noise: one release.

        ``start`` is what the clients started from, per payload key; ``starts``
        (one per reply, default ``start``) differ for lower-rank nodes
        (``validation.reference``). Flower's wrappers clip reply - start with one
        start for all, so a lower-rank reply is moved onto ``start`` by its own
        update, and the mean of the starts is restored after the noise: the
        release is mean_k(start_k + clip(update_k)) + noise. A node's rank is
        node configuration, not data: the shift is the same for neighbouring
        datasets and costs no privacy. Flower's wrappers match reply and start
        arrays by position, so both are put in the order of ``start``; the
        replies are copies (weights and order only)."""
        keys = list(start)
        starts = starts or [start] * len(replies)
        copies = []
        for content, own in zip(replies, starts, strict=True):
            record = next(iter(content.array_records.values()))
            arrays = {}
            for k in keys:
                value = np.asarray(record[k].numpy())
                if own[k] is not start[k]:  # a lower-rank factor: its update, placed on the common start
                    value = (start[k] + (value.astype(np.float64) - own[k])).astype(np.float32)
                arrays[k] = Array(value)
            copies.append(
                Message(
                    RecordDict(
                        {
                            "arrays": ArrayRecord(arrays),
                            "metrics": MetricRecord({UNIT_WEIGHT: 1}),
                        }
                    ),
                    dst_node_id=0,
                    message_type="train",
                )
            )
        if self.mode == "server-fixed":
            for m in copies:
                validation.clip_update(m.content, start, self.clip_norm)
        if self.mode == "server-adaptive":  # Flower clips: the update is reply - start
            self.wrapper.current_arrays = ArrayRecord({k: Array(np.asarray(start[k], np.float32)) for k in keys})
        clip_used = self.clip_norm
        arrays, _ = self.wrapper.aggregate_train(server_round, copies)
        out = {k: np.asarray(arrays[k].numpy(), np.float32) for k in keys}
        if self.mode == "server-adaptive" and self.clip_norm < clip_used:
            # Flower 1.42 updates C before adding noise of std z·C_new/m; the
            # round clipped at C_used, so top the noise up to z·C_used/m.
            std = self.wrapper.noise_multiplier * (clip_used**2 - self.clip_norm**2) ** 0.5 / self.num_sampled
            out = {k: v + secure_gaussian(v.shape, std).numpy() for k, v in out.items()}
        for k in keys:
            if any(own[k] is not start[k] for own in starts):
                shift = np.mean([own[k] for own in starts], axis=0) - start[k]
                out[k] = (out[k] + shift).astype(np.float32)
        self.releases += 1
        return ArrayRecord({k: Array(v) for k, v in out.items()})

    def epsilon(self) -> float:
        return user_epsilon(self.noise_multiplier, self.releases, self.delta)

    def state(self) -> dict:
        return {"releases": self.releases, "clip-norm": self.clip_norm}

    def load_state(self, state: dict) -> None:
        self.releases = int(state["releases"])
        self.wrapper.clipping_norm = float(state["clip-norm"])
