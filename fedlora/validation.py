"""Server-side checks of a client's training reply, before aggregation.

A federation spans machines the server does not control: a reply is used only
if it has exactly the method's tensors with the expected shapes and dtype, all
values finite, a positive integer example count, comes from a node selected
this round, and its update is not far larger than the round's median (with
fewer replies than a median needs: than earlier rounds' median, and than the
most an honest node's local training can move, ``UpdateBound``). Each check
returns a reason naming what failed; the strategy logs it with the node.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, RecordDict

from .config import DPConfig, RunConfig

WEIGHT_KEY = "num-examples"
MAX_EXAMPLES = 10**9  # a claim beyond this is not a node's data set (1e300 would overflow the weights)
MIN_REPLIES_FOR_NORM_CHECK = 3  # a median of fewer replies says little about outliers


def lower_rank(key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """A LoRA factor of rank 1..r where rank r is expected (A: rows, B: columns)."""
    if len(shape) != 2 or len(expected) != 2:
        return False
    if ".lora_A." in key:
        return shape[1] == expected[1] and 1 <= shape[0] <= expected[0]
    return ".lora_B." in key and shape[0] == expected[0] and 1 <= shape[1] <= expected[1]


def check_reply(content: RecordDict, shapes: dict[str, tuple[int, ...]], flexible_rank: bool = False) -> str | None:
    """None if the reply is well-formed, else the reason it is not. With
    ``flexible_rank``, LoRA factors may have a lower rank than ``shapes``."""
    arrays, metrics = list(content.array_records.values()), list(content.metric_records.values())
    if len(arrays) != 1 or len(metrics) != 1:
        return f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and {len(metrics)}"
    record, metric = arrays[0], metrics[0]
    keys = set(record.keys())
    if keys != set(shapes):
        extra, missing = sorted(keys - set(shapes))[:3], sorted(set(shapes) - keys)[:3]
        return f"payload keys differ from the method's (unexpected {extra}, missing {missing})"
    for key, expected in shapes.items():
        array = record[key]
        if tuple(array.shape) != tuple(expected) and not (flexible_rank and lower_rank(key, tuple(array.shape), tuple(expected))):
            return f"{key} has shape {tuple(array.shape)}, expected {tuple(expected)}"
        if array.dtype != "float32":
            return f"{key} has dtype {array.dtype}, expected float32"
        if not np.isfinite(array.numpy()).all():
            return f"{key} has non-finite values"
    if flexible_rank:  # one rank per layer: A's rows = B's columns
        for key in shapes:
            pair = key.replace(".lora_A.", ".lora_B.")
            if ".lora_A." in key and pair in shapes and record[key].shape[0] != record[pair].shape[1]:
                return f"{key} has rank {record[key].shape[0]} but {pair} has rank {record[pair].shape[1]}"
    n = metric.get(WEIGHT_KEY)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n != int(n) or n <= 0:
        return f"'{WEIGHT_KEY}' must be a positive integer, got {n!r}"
    if n > MAX_EXAMPLES:
        return f"'{WEIGHT_KEY}' = {n:.4g} is more than {MAX_EXAMPLES:.0e} examples"
    for key, value in metric.items():  # a NaN metric would poison averages (and a NaN epsilon vanish in max)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            return f"metric '{key}' is not a finite number"
    if float(metric.get("epsilon", 0.0)) < 0:
        return "metric 'epsilon' is negative"
    return None


def capped_shares(weights: list[float], max_share: float) -> list[float]:
    """Aggregation weights (summing to 1) proportional to ``weights``, with no
    share above ``max_share`` (at least 1/len: equal shares): the excess of a
    capped reply goes to the others in proportion (water-filling). No reply's
    claimed example count can then dominate the aggregate."""
    k = len(weights)
    cap = max(max_share, 1.0 / k)
    shares, fixed = [0.0] * k, set()
    while True:
        free = [i for i in range(k) if i not in fixed]
        left = 1.0 - cap * len(fixed)
        total = sum(weights[i] for i in free)
        for i in free:
            shares[i] = left * weights[i] / total if total > 0 else left / len(free)
        over = [i for i in free if shares[i] > cap * (1 + 1e-12)]
        if not over:
            break
        for i in over:
            shares[i] = cap
            fixed.add(i)
    return shares


def reference(content: RecordDict, sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Where the reply's node started, per key, for a reply not yet padded:
    what the server sent, or for a lower-rank factor (heterogeneous ranks) the
    first rows of A / columns of B the node kept, zero-padded to the global
    shape. Measured against it, the update of a rank-r_k node covers only what
    it trained; the rows it never received pad to zero on both sides."""
    record = next(iter(content.array_records.values()))
    out = {}
    for key, value in sent.items():
        shape = tuple(record[key].shape)
        if shape == value.shape:
            out[key] = value  # the same object: callers may test ``is`` for "not truncated"
        else:
            ref = np.zeros_like(value)
            ref[: shape[0], : shape[1]] = value[: shape[0], : shape[1]]
            out[key] = ref
    return out


def update_norm(content: RecordDict, sent: dict[str, np.ndarray]) -> float:
    """L2 norm of (reply - what the server sent), over all tensors."""
    record = next(iter(content.array_records.values()))
    return math.sqrt(sum(float(np.sum((record[k].numpy().astype(np.float64) - v) ** 2)) for k, v in sent.items()))


def norm_outliers(
    norms: dict[int, float],
    max_ratio: float,
    earlier: list[float] = (),
    bounds: Mapping[int, tuple[float, str]] | None = None,
) -> dict[int, str]:
    """Nodes whose update norm exceeds its absolute bound in ``bounds`` (node ->
    (bound, what it is), e.g. ``UpdateBound.limit``), or ``max_ratio`` x the
    round's median; with fewer replies than a median needs, x the median of the
    norms accepted in earlier rounds (``earlier``), if any. ``max_ratio`` 0
    turns every check off."""
    if max_ratio <= 0 or not norms:
        return {}
    out = {
        node: f"update norm {norms[node]:.4g} is above {bound:.4g}, the most an honest update can move ({what})"
        for node, (bound, what) in (bounds or {}).items()
        if norms[node] > bound
    }
    if len(norms) >= MIN_REPLIES_FOR_NORM_CHECK:
        median, what = statistics.median(norms.values()), "the round median"
    elif earlier:
        median, what = statistics.median(earlier), "the median of earlier rounds"
    else:
        return out
    bound = max_ratio * median
    for node, norm in norms.items():
        if node not in out and norm > bound:
            out[node] = f"update norm {norm:.4g} is above {max_ratio:g} x {what} {median:.4g}"
    return out


# -- the most an honest update can move ------------------------------------------

NOISE_TAIL = 8.0  # ||N(0, I_d)|| > sqrt(d) + 8 with probability <= exp(-8^2 / 2) ~ 1e-14
BATCH_TAIL = 10.0  # Poisson draws of mean mu pass mu + 10 sqrt(mu) + 10 with probability <= ~5e-12
MARGIN = 1.01  # float32 training arithmetic (a step's rounding, Opacus' clip factor C / (norm + 1e-6))
SIGMA_SLACK = 1.1  # how far a reported noise multiplier may exceed the server's own calibration (library versions)
ADAMW_BETAS = (0.9, 0.999)  # torch's AdamW defaults, which training.make_optimizer keeps
# Relative rounding of one value in each wire format (unit roundoff); float32 and
# float64 replies are float32 on the server.
ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
FP16_TINY = 2.0**-25  # float16's absolute rounding of values near zero (subnormals)


def adamw_step_bound(t: int, betas: tuple[float, float] = ADAMW_BETAS) -> float:
    """The most one coordinate can move at AdamW's step ``t`` (1-based), in units
    of the learning rate, whatever the gradients (weight decay 0).

    The step is lr m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps), with
    m_t = (1 - b1) sum_s b1^(t-s) g_s and v_t = (1 - b2) sum_s b2^(t-s) g_s^2.
    Writing b1^(t-s) g_s = (b1^2 / b2)^((t-s)/2) * b2^((t-s)/2) g_s, Cauchy-Schwarz gives
    |m_t| <= (1 - b1) sqrt(sum_{j<t} g^j) sqrt(v_t / (1 - b2)), g = b1^2 / b2 < 1, so

        |step| / lr <= (1 - b1) / sqrt(1 - b2) * sqrt((1 - g^t) / (1 - g)) * sqrt(1 - b2^t) / (1 - b1^t),

    attained by g_s proportional to (b1 / b2)^(t-s) (eps > 0 only shrinks the step).
    For torch's defaults (0.9, 0.999): 1 at t = 1 (a sign step), 1.043 at t = 10,
    2.24 at t = 100, rising to 0.1 / sqrt(0.001) / sqrt(1 - 0.81 / 0.999) = 7.2703."""
    b1, b2 = betas
    g = b1 * b1 / b2
    return (1 - b1) / math.sqrt(1 - b2) * math.sqrt((1 - g**t) / (1 - g)) * math.sqrt(1 - b2**t) / (1 - b1**t)


@functools.lru_cache(maxsize=1024)
def planned_noise(dp: DPConfig, num_examples: int, batch_size: int, planned_steps: int) -> float:
    """The noise multiplier a node with ``num_examples`` examples calibrates for the
    run (``privacy.PrivacyLedger.plan``, as the node does); ConfigError if none
    reaches ``dp.epsilon``. About a second per new count; cached."""
    from .privacy import PrivacyLedger

    return PrivacyLedger.plan(dp, num_examples, batch_size, planned_steps).noise_multiplier


@dataclass(frozen=True)
class UpdateBound:
    """What the server knows of every node's local training (the run config), and
    the largest update norm ||reply - start|| an honest node can send with it.

    **DP-SGD with plain SGD** (``optimizer = sgd``: no momentum, no weight decay).
    Each of the T = ``local-steps`` steps adds -lr (sum_{i in batch t} clip_C(g_i) + s C z_t) / B_e
    (Opacus, ``loss_reduction = mean``), with C = ``dp.max-grad-norm``, s the node's
    noise multiplier, z_t ~ N(0, I_d) drawn afresh each step, and B_e its expected
    Poisson batch, max(1, round(q n)) with q = min(1, batch-size / n): B_e =
    min(batch-size, n) for its n examples. So the update is
    -lr (sum of every clipped gradient drawn + s C sum_t z_t) / B_e, and

    - the clipped gradients (norm <= C each) are at most the examples drawn over
      the T steps, a sum of T n independent coin flips of mean T B_e: at most
      S = min(T n, T B_e + 10 sqrt(T B_e) + 10) except with probability <= ~5e-12
      (Bernstein's inequality; exactly T n when q = 1);
    - sum_t z_t ~ sqrt(T) N(0, I_d), whatever the gradients did (each z_t is
      independent of everything before it), and ||N(0, I_d)|| <= sqrt(d) + 8
      except with probability <= exp(-32) (the norm is 1-Lipschitz, its mean <= sqrt(d)),
      d the values in the reply. Hence

        ||update|| <= lr C (S + s sqrt(T) (sqrt(d) + 8)) / B_e.

    The reply is a part of what the node trained (FedSA-LoRA keeps B): the noise
    on those d values is d-dimensional and the clipped part is still <= C per
    example, so the bound holds for it with its own d. An update of a lower-rank
    node (zero-padded) has fewer values than the global d used here.

    s: the server does not take the node's word. It calibrates, as the node does
    (``planned_noise``), the multiplier of a node with the claimed ``num-examples``;
    a reported ``noise-multiplier`` raises it only up to ``SIGMA_SLACK`` x that (a
    node whose libraries calibrate slightly differently), never lowers it. A
    count for which no multiplier reaches the budget is a claim no honest node
    makes: ConfigError.

    **AdamW** (weight decay 0; with or without DP): every coordinate moves by at most
    lr c_t at step t (``adamw_step_bound``), so ||update|| <= lr sqrt(d) sum_{t<=T} c_t,
    which does not depend on the gradients, the noise or any claim.

    **Plain SGD without DP** still clips each sample's gradient to C =
    ``dp.max-grad-norm`` and averages over the fixed batch (DP-SGD minus the
    noise), so a step moves by at most lr C and ||update|| <= lr T C; with
    ``dp.max-grad-norm = 0`` nothing is clipped and there is no bound: ``limit``
    returns None and screening stays with the medians.

    What a lying node gains: little from its noise report (at most 10% more
    noise term) and nothing from its step count (not read). Its claimed example
    count sets B_e and s: claiming n <= batch-size gives it the bound of an
    honest node that small, B_e = n and s calibrated for q = 1, the noisiest the
    run allows (at epsilon 3 over 50 steps, T = 10: lr C (10 + 33.5 (sqrt(d) + 8))
    for n = 1, against lr C (14.1 + 0.036 (sqrt(d) + 8)) for 5000 examples at
    batch 64), and never more. With three or more replies a small claim also
    shrinks its weight in the aggregate; with one or two, the default
    ``aggregation.max-weight-share`` (0.5) gives each reply an equal share
    whatever it claims. Within the bound a node still chooses the update's direction: the
    bound stops a scaled or replaced model, not a bias of honest size.
    """

    optimizer: str
    learning_rate: float
    local_steps: int
    batch_size: int
    dp: DPConfig | None = None  # sample-level DP-SGD; None: the nodes train without it
    planned_steps: int = 0  # the steps each node's noise is calibrated for: rounds x local-steps
    clip: float = 0.0  # without DP: the per-sample clipping norm (0 = not clipped)

    @classmethod
    def from_run(cls, run: RunConfig) -> UpdateBound:
        t = run.train
        dp = run.dp if run.dp.enabled else None
        clip = 0.0 if dp else run.dp.max_grad_norm
        return cls(str(t.optimizer), t.learning_rate, t.local_steps, t.batch_size, dp, run.num_server_rounds * t.local_steps, clip)

    @property
    def bounded(self) -> bool:
        """Whether honest updates have a bound (not: plain SGD without DP or clipping)."""
        return self.optimizer == "adamw" or self.dp is not None or self.clip > 0

    def exact(self, values: int, num_examples: int, noise_multiplier: float | None = None) -> tuple[float, str] | None:
        """(bound, how it was derived) on the norm of an honest update of ``values``
        values, computed exactly; None when there is none (plain SGD without DP or clipping)."""
        lr, steps = self.learning_rate, self.local_steps
        if self.optimizer == "adamw":
            per_coordinate = sum(adamw_step_bound(t) for t in range(1, steps + 1))
            return MARGIN * lr * per_coordinate * math.sqrt(values), f"AdamW: lr {lr:g}, {steps} steps, {values} values"
        if self.dp is None:
            if self.clip <= 0:
                return None
            return MARGIN * lr * steps * self.clip, f"SGD: lr {lr:g}, {steps} steps, each sample's gradient clipped to {self.clip:g}, no noise"
        n = int(num_examples)
        sigma = planned_noise(self.dp, n, self.batch_size, self.planned_steps)
        reported = float(noise_multiplier) if isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) else 0.0
        sigma = max(sigma, min(reported, SIGMA_SLACK * sigma))
        clip = self.dp.max_grad_norm
        expected = max(1, min(self.batch_size, n))
        mean = steps * expected  # examples drawn over the T steps, on average
        drawn = mean if expected == n else min(steps * n, mean + BATCH_TAIL * math.sqrt(mean) + BATCH_TAIL)
        bound = MARGIN * lr * clip * (drawn + sigma * math.sqrt(steps) * (math.sqrt(values) + NOISE_TAIL)) / expected
        return bound, f"DP-SGD: lr {lr:g}, {steps} steps, clip {clip:g}, noise {sigma:.4g}, expected batch {expected}, {values} values"

    def limit(
        self,
        values: int,
        num_examples: int,
        noise_multiplier: float | None = None,
        *,
        roundoff: float = 0.0,
        start_norm: float = 0.0,
        reply_norm: float = 0.0,
        tiny: float = 0.0,
    ) -> tuple[float, str] | None:
        """``exact`` plus what rounding adds to the update the server measures:
        float32 training (each of the T steps rounds a value by <= 2^-24 of it)
        and the reply's wire format (``roundoff``, relative, ``tiny`` absolute per
        value). The start is what the node received, so only the reply's own
        rounding counts: (roundoff + T 2^-23) (||start|| + ||reply||) + tiny sqrt(d)."""
        exact = self.exact(values, num_examples, noise_multiplier)
        if exact is None:
            return None
        bound, what = exact
        slack = (roundoff + self.local_steps * 2.0**-23) * (start_norm + reply_norm) + tiny * math.sqrt(values)
        return bound + slack, what


def clip_update(content: RecordDict, sent: dict[str, np.ndarray], clip_norm: float) -> float:
    """Scale the reply's update (reply - sent) to L2 norm <= ``clip_norm``, in
    place; return the factor applied (1.0 when within the bound)."""
    record = next(iter(content.array_records.values()))
    norm = update_norm(content, sent)
    if norm <= clip_norm:
        return 1.0
    scale = clip_norm / norm
    for key, base in sent.items():
        value = base + (record[key].numpy() - base) * scale
        record[key] = Array(value.astype(np.float32))
    return scale
