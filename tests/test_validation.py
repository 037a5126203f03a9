"""Server-side validation of client updates: one test per check."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.strategies import FfaLoraStrategy

from conftest import FakeGrid

D, R = 6, 2
KB = "layer.lora_B.default.weight"
GLOBAL = np.zeros((D, R), np.float32)


pytestmark = pytest.mark.usefixtures("server_task_identity")


def _round(strategy, nodes=(1, 2, 3, 4, 5)):
    """Configure round 1 for ``nodes``; return the messages sent, by node."""
    msgs = strategy.configure_train(1, ArrayRecord({KB: Array(GLOBAL)}), ConfigRecord(), FakeGrid(nodes))
    return {m.metadata.dst_node_id: m for m in msgs}


def _reply(request, arrays=None, metrics=None):
    arrays = {KB: np.full((D, R), 0.1, np.float32)} if arrays is None else arrays
    metrics = {"num-examples": 10, "epsilon": 1.0} if metrics is None else metrics
    return Message(
        RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)}),
        reply_to=request,
    )


def _aggregate(strategy, replies):
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, strategy.rounds[1]


def _strategy(**kw):
    return FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x", min_train_nodes=1, min_available_nodes=1, **kw)


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ({"arrays": {KB: np.zeros((R, D), np.float32)}}, "has shape (2, 6), expected (6, 2)"),
        ({"arrays": {KB: np.zeros((D, R), np.int8)}}, "dtype int8"),  # float64 is decoded to float32 (tests/test_wire_dtype.py)
        ({"arrays": {KB: np.full((D, R), np.nan, np.float32)}}, "non-finite"),
        ({"arrays": {KB: np.full((D, R), np.inf, np.float32)}}, "non-finite"),
        ({"arrays": {"other.weight": np.zeros((D, R), np.float32)}}, "payload keys differ"),
        ({"metrics": {"num-examples": 0, "epsilon": 1.0}}, "positive integer"),
        ({"metrics": {"num-examples": 2.5, "epsilon": 1.0}}, "positive integer"),
        ({"metrics": {"num-examples": -3, "epsilon": 1.0}}, "positive integer"),
        ({"metrics": {"epsilon": 1.0}}, "positive integer"),
    ],
)
def test_malformed_reply_is_excluded_with_node_and_reason(bad, fragment):
    s = _strategy()
    sent = _round(s, nodes=(1, 2))
    arrays, stats = _aggregate(s, [_reply(sent[1]), _reply(sent[2], **bad)])
    assert stats.replies == 1 and len(stats.failures) == 1
    assert stats.failures[0].startswith("node 2:") and fragment in stats.failures[0]
    np.testing.assert_allclose(arrays[KB].numpy(), 0.1)  # only node 1's update


def test_reply_from_a_node_not_selected_this_round_is_excluded():
    s = _strategy()
    sent = _round(s, nodes=(1, 2))
    stranger = Message(RecordDict({}), dst_node_id=99, message_type="train")
    _, stats = _aggregate(s, [_reply(sent[1]), _reply(sent[2]), _reply(stranger)])
    assert stats.replies == 2 and stats.failures == ["node 99: not selected for this round"]


def test_a_second_reply_from_the_same_node_is_excluded():
    s = _strategy()
    sent = _round(s, nodes=(1, 2))
    again = _reply(sent[2], arrays={KB: np.full((D, R), 5.0, np.float32)})
    arrays, stats = _aggregate(s, [_reply(sent[1]), _reply(sent[2]), again])
    assert stats.replies == 2 and stats.failures == ["node 2: more than one reply this round (the first is used)"]
    np.testing.assert_allclose(arrays[KB].numpy(), 0.1)  # node 2 counted once, with its first reply


def test_update_norm_far_above_the_median_is_excluded():
    s = _strategy(max_norm_ratio=10.0)
    sent = _round(s)
    replies = [_reply(sent[n]) for n in (1, 2, 3, 4)] + [_reply(sent[5], arrays={KB: np.full((D, R), 100.0, np.float32)})]
    arrays, stats = _aggregate(s, replies)
    assert stats.replies == 4 and len(stats.failures) == 1
    assert stats.failures[0].startswith("node 5:") and "median" in stats.failures[0]
    np.testing.assert_allclose(arrays[KB].numpy(), 0.1)
    # With the check off, the same round is dragged away by the outlier.
    s = _strategy(max_norm_ratio=0.0)
    sent = _round(s)
    replies = [_reply(sent[n]) for n in (1, 2, 3, 4)] + [_reply(sent[5], arrays={KB: np.full((D, R), 100.0, np.float32)})]
    arrays, stats = _aggregate(s, replies)
    assert stats.replies == 5 and arrays[KB].numpy().max() > 10


def test_too_few_valid_replies_keep_the_global_adapter():
    s = _strategy(min_replies=2)
    sent = _round(s, nodes=(1, 2))
    arrays, stats = _aggregate(s, [_reply(sent[1]), _reply(sent[2], arrays={KB: np.full((D, R), np.nan, np.float32)})])
    assert arrays is None and stats.replies == 0 and len(stats.failures) == 1


# -- robust aggregation: 1 of 5 clients hostile -------------------------------------

HONEST = [np.full((D, R), v, np.float32) for v in (0.9, 1.0, 1.1, 1.0, 0.95)][:4]


def _attack_distance(attack: str, **kw) -> float:
    """Distance of the aggregate from the honest clients' mean, with node 5 attacking."""
    s = _strategy(max_norm_ratio=0.0, **kw)  # validation off: measure the aggregator alone
    sent = _round(s)
    honest_mean = np.mean(HONEST, axis=0)
    hostile = honest_mean * 100 if attack == "scaled" else -honest_mean
    replies = [_reply(sent[n], arrays={KB: HONEST[n - 1]}) for n in (1, 2, 3, 4)]
    replies.append(_reply(sent[5], arrays={KB: hostile.astype(np.float32)}))
    arrays, _ = _aggregate(s, replies)
    return float(np.linalg.norm(arrays[KB].numpy() - honest_mean) / np.linalg.norm(honest_mean))


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
def test_robust_aggregation_resists_one_hostile_client_where_mean_does_not(attack):
    mean = _attack_distance(attack)
    median = _attack_distance(attack, aggregation="median")
    trimmed = _attack_distance(attack, aggregation="trimmed-mean", trim_fraction=0.2)
    clipped = _attack_distance(attack, clip_norm=float(np.linalg.norm(np.mean(HONEST, axis=0))) * 1.2)
    print(f"{attack}: relative distance to the honest mean — mean {mean:.3f}, median {median:.3f}, trimmed {trimmed:.3f}, clipped mean {clipped:.3f}")
    assert mean > 0.35  # plain averaging is dragged away
    assert median < 0.06 and trimmed < 0.06
    if attack == "scaled":
        assert clipped < 0.1  # clipping bounds a large update's pull
