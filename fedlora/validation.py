"""Server-side checks of a client's training reply, before aggregation.

A federation spans machines the server does not control: a reply is used only
if it has exactly the method's tensors with the expected shapes and dtype, all
values finite, a positive integer example count, comes from a node selected
this round, and its update is not far larger than the round's median. Each
check returns a reason naming what failed; the strategy logs it with the node.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from flwr.app import Array, RecordDict

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


def norm_outliers(norms: dict[int, float], max_ratio: float, earlier: list[float] = ()) -> dict[int, str]:
    """Nodes whose update norm exceeds ``max_ratio`` x the round's median; with
    fewer replies than a median needs, x the median of the norms accepted in
    earlier rounds (``earlier``), if any."""
    if max_ratio <= 0 or not norms:
        return {}
    if len(norms) >= MIN_REPLIES_FOR_NORM_CHECK:
        median, what = statistics.median(norms.values()), "the round median"
    elif earlier:
        median, what = statistics.median(earlier), "the median of earlier rounds"
    else:
        return {}
    bound = max_ratio * median
    return {node: f"update norm {norm:.4g} is above {max_ratio:g} x {what} {median:.4g}" for node, norm in norms.items() if norm > bound}


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
