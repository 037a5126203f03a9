"""A hostile client cannot take over the aggregate: one test per attack, each
failing on a server that trusts a reply's claimed example count or metrics."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora import validation
from fedlora.strategies import FfaLoraStrategy

D, R = 6, 2
KB = "layer.lora_B.default.weight"
GLOBAL = np.zeros((D, R), np.float32)


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def _strategy(**kw):
    kw.setdefault("max_weight_share", 0.5)  # the run-config default
    return FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x", min_train_nodes=1, min_available_nodes=1, **kw)


def _round(strategy, server_round, nodes, replies):
    """Send round ``server_round`` to ``nodes``; ``replies``: node -> (value of B, metrics)."""
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, ArrayRecord({KB: Array(GLOBAL)}), ConfigRecord(), Grid(nodes))}
    answers = [
        Message(RecordDict({"arrays": ArrayRecord({KB: Array(np.full((D, R), v, np.float32))}), "metrics": MetricRecord(m)}), reply_to=msgs[n])
        for n, (v, m) in replies.items()
    ]
    arrays, _ = strategy.aggregate_train(server_round, answers)
    return arrays, strategy.rounds[server_round]


def test_an_absurd_example_count_is_refused():
    arrays, stats = _round(_strategy(), 1, [1, 2], {1: (0.1, {"num-examples": 100}), 2: (5.0, {"num-examples": 1e300})})
    assert stats.replies == 1 and any(f.startswith("node 2:") and "more than" in f for f in stats.failures)
    np.testing.assert_allclose(arrays[KB].numpy(), 0.1)  # the attacker's update is not in the aggregate


def test_a_large_claimed_count_cannot_dominate_the_aggregate():
    # 1e9 examples against 100 each: plain example weighting would return the attacker's update.
    replies = {1: (0.0, {"num-examples": 100}), 2: (0.0, {"num-examples": 100}), 3: (9.0, {"num-examples": 10**9})}
    arrays, stats = _round(_strategy(max_norm_ratio=0.0), 1, [1, 2, 3], replies)
    assert stats.replies == 3
    np.testing.assert_allclose(arrays[KB].numpy(), 0.5 * 9.0, rtol=1e-5)  # its share is capped at one half
    assert stats.client_metrics[3]["num-examples"] == 10**9  # the claim is still reported as made
    plain, _ = _round(_strategy(max_norm_ratio=0.0, max_weight_share=1.0), 1, [1, 2, 3], replies)
    assert plain[KB].numpy().min() > 8.99  # what the cap prevents


def test_non_finite_metrics_are_refused():
    replies = {
        1: (0.1, {"num-examples": 10, "epsilon": 1.0}),
        2: (0.1, {"num-examples": 10, "epsilon": float("nan")}),
        3: (0.1, {"num-examples": 10, "train-loss": float("inf")}),
    }
    _, stats = _round(_strategy(), 1, [1, 2, 3], replies)
    assert stats.replies == 1 and len([f for f in stats.failures if "not a finite number" in f]) == 2


def test_with_fewer_than_three_replies_updates_are_screened_against_earlier_rounds():
    s = _strategy(max_norm_ratio=10.0)
    _, first = _round(s, 1, [1, 2], {1: (0.1, {"num-examples": 10}), 2: (0.12, {"num-examples": 10})})
    assert first.replies == 2  # round 1: nothing to compare with yet
    _, second = _round(s, 2, [1, 2], {1: (0.1, {"num-examples": 10}), 2: (50.0, {"num-examples": 10})})
    assert second.replies == 1 and any(f.startswith("node 2:") and "earlier rounds" in f for f in second.failures)
    assert s.state()["accepted-norms"]  # kept in checkpoints: a resumed run screens the same way


@pytest.mark.parametrize(
    ("weights", "cap", "expected"),
    [
        ([1, 1, 1], 0.5, [1 / 3] * 3),
        ([1, 1, 1e9], 0.5, [0.25, 0.25, 0.5]),
        ([8, 1, 1], 0.5, [0.5, 0.25, 0.25]),
        ([5, 3, 2], 1.0, [0.5, 0.3, 0.2]),
        ([1, 1e9], 0.5, [0.5, 0.5]),  # two replies: at most equal
        ([7], 0.5, [1.0]),
    ],
)
def test_capped_shares(weights, cap, expected):
    shares = validation.capped_shares(weights, cap)
    assert shares == pytest.approx(expected) and sum(shares) == pytest.approx(1.0)
