"""A hostile client cannot take over the aggregate: one test per attack, each
failing on a server that trusts a reply's claimed example count or metrics."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora import validation
from fedlora.config import DPConfig
from fedlora.strategies import FfaLoraStrategy

from conftest import FakeGrid

D, R = 6, 2
KB = "layer.lora_B.default.weight"
GLOBAL = np.zeros((D, R), np.float32)


pytestmark = pytest.mark.usefixtures("server_task_identity")


def _strategy(**kw):
    kw.setdefault("max_weight_share", 0.5)  # the run-config default
    return FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x", min_train_nodes=1, min_available_nodes=1, **kw)


def _round(strategy, server_round, nodes, replies):
    """Send round ``server_round`` to ``nodes``; ``replies``: node -> (value of B, metrics)."""
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, ArrayRecord({KB: Array(GLOBAL)}), ConfigRecord(), FakeGrid(nodes))}
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


# -- round 1 with one or two replies: the most an honest node's training can move ----------

N, BATCH, STEPS, LR, CLIP, EPS = 200, 8, 3, 0.5, 1.0, 2.0


def _bound(optimizer="sgd", epsilon=EPS, **kw):
    dp = DPConfig(epsilon=epsilon, max_grad_norm=CLIP) if epsilon > 0 else None
    return validation.UpdateBound(optimizer, LR, STEPS, BATCH, dp, 2 * STEPS, **kw)


def _bounded(bound, shape, **kw):
    kw.setdefault("max_norm_ratio", 10.0)
    return FfaLoraStrategy(payload_shapes={KB: shape}, fingerprint="x", min_train_nodes=1, min_available_nodes=1, update_bound=bound, **kw)


def _send(strategy, start, replies, server_round=1):
    """Round ``server_round`` from ``start`` (B); ``replies``: node -> (B it sends, metrics)."""
    msgs = {
        m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, ArrayRecord({KB: Array(start)}), ConfigRecord(), FakeGrid(sorted(replies)))
    }
    answers = [Message(RecordDict({"arrays": ArrayRecord({KB: Array(b)}), "metrics": MetricRecord(m)}), reply_to=msgs[n]) for n, (b, m) in replies.items()]
    arrays, _ = strategy.aggregate_train(server_round, answers)
    return arrays, strategy.rounds[server_round]


def _dp_sgd_update(shape, sigma, seed=0):
    """An update as DP-SGD with plain SGD makes it, at the edge of honesty: every
    clipped per-example gradient of norm C and aligned, a batch 3 standard
    deviations above its expected size, Gaussian noise of the node's multiplier."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    batch = BATCH + 3 * np.sqrt(BATCH)
    steps = [CLIP * batch * direction + sigma * CLIP * rng.normal(size=d) for _ in range(STEPS)]
    return (-LR * np.sum(steps, axis=0) / BATCH).reshape(shape).astype(np.float32)


def test_round_one_with_one_reply_is_screened_against_the_most_dp_sgd_can_move():
    shape = (64, 16)
    sigma = validation.planned_noise(DPConfig(epsilon=EPS, max_grad_norm=CLIP), N, BATCH, 2 * STEPS)
    start = np.random.default_rng(1).normal(0, 0.1, shape).astype(np.float32)
    honest = start + _dp_sgd_update(shape, sigma)
    metrics = {"num-examples": N, "noise-multiplier": sigma}
    arrays, stats = _send(_bounded(_bound(), shape), start, {1: (honest, metrics)})
    assert stats.replies == 1 and not stats.failures
    np.testing.assert_array_equal(arrays[KB].numpy(), honest)
    scaled = start + 100 * (honest - start)
    for replies in ({1: (scaled, metrics)}, {1: (honest, metrics), 2: (scaled, metrics)}):
        arrays, stats = _send(_bounded(_bound(), shape), start, replies)
        assert stats.replies == len(replies) - 1 and len(stats.failures) == 1, stats.failures
        failure = stats.failures[0]
        assert failure.startswith(f"node {len(replies)}:") and "the most an honest update can move" in failure and "DP-SGD" in failure
    np.testing.assert_array_equal(arrays[KB].numpy(), honest)  # two replies: only the honest one
    # A model replacement (not an update at all) is far outside too.
    _, stats = _send(_bounded(_bound(), shape), start, {1: (np.full(shape, 3.0, np.float32), metrics)})
    assert stats.replies == 0 and stats.failures[0].startswith("node 1:")


def test_a_reported_noise_multiplier_cannot_excuse_an_update_nor_tighten_the_bound():
    shape = (64, 16)
    sigma = validation.planned_noise(DPConfig(epsilon=EPS, max_grad_norm=CLIP), N, BATCH, 2 * STEPS)
    start = np.zeros(shape, np.float32)
    honest = _dp_sgd_update(shape, sigma, seed=3)
    # A node that claims a huge noise multiplier: at most 10% more noise term than its claimed count gets.
    _, stats = _send(_bounded(_bound(), shape), start, {1: (100 * honest, {"num-examples": N, "noise-multiplier": 1e6})})
    assert stats.replies == 0 and "the most an honest update can move" in stats.failures[0]
    # A missing or negative report does not make the bound smaller than the node's calibrated noise gives.
    for metrics in ({"num-examples": N}, {"num-examples": N, "noise-multiplier": -5.0}):
        _, stats = _send(_bounded(_bound(), shape), start, {1: (honest, metrics)})
        assert stats.replies == 1 and not stats.failures


def test_a_node_claiming_few_examples_gets_the_bound_of_an_honest_node_that_small():
    # n <= batch-size: sampling rate 1, the largest noise and the smallest divisor the run allows.
    shape = (64, 16)
    small, large = (_bound().limit(64 * 16, n) for n in (1, N))
    assert small[0] > 10 * large[0]
    assert "noise" in small[1] and "expected batch 1" in small[1]
    # A reported noise multiplier raises it by at most 10% of the calibrated one's noise term.
    sigma = validation.planned_noise(DPConfig(epsilon=EPS, max_grad_norm=CLIP), 1, BATCH, 2 * STEPS)
    lied = _bound().limit(64 * 16, 1, 1e9)[0]
    assert lied == pytest.approx(_bound().limit(64 * 16, 1, 1.1 * sigma)[0]) and small[0] < lied < 1.1 * small[0]
    # Still a bound: a model replaced by values of 1e3 is refused whatever the node claims.
    _, stats = _send(
        _bounded(_bound(), shape), np.zeros(shape, np.float32), {1: (np.full(shape, 1e3, np.float32), {"num-examples": 1, "noise-multiplier": 1e9})}
    )
    assert stats.replies == 0 and stats.failures[0].startswith("node 1:")


def test_adamw_moves_each_coordinate_at_most_its_worst_case_step():
    # Constant gradients: torch's AdamW moves every coordinate by lr per step, about the worst case early on.
    shape = (64, 16)
    p = torch.zeros(shape, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=LR, weight_decay=0.0)
    for _ in range(STEPS):
        p.grad = torch.ones(shape)
        opt.step()
    start = np.zeros(shape, np.float32)
    update = p.detach().numpy().astype(np.float32)
    for epsilon in (0.0, EPS):  # with or without DP
        _, stats = _send(_bounded(_bound("adamw", epsilon), shape), start, {1: (update, {"num-examples": N})})
        assert stats.replies == 1 and not stats.failures
        _, stats = _send(_bounded(_bound("adamw", epsilon), shape), start, {1: (1.05 * update, {"num-examples": N})})
        assert stats.replies == 0 and "AdamW" in stats.failures[0] and stats.failures[0].startswith("node 1:")
    assert validation.adamw_step_bound(1) == pytest.approx(1.0)
    assert max(validation.adamw_step_bound(t) for t in (10, 100, 10**4, 10**6)) == pytest.approx(0.1 / np.sqrt(0.001) / np.sqrt(1 - 0.81 / 0.999))


def test_the_adamw_step_bound_is_reached_by_torch():
    # The gradients that maximise step t: g_s proportional to (b1 / b2)^(t - s).
    for t in (1, 2, 10, 50):
        p = torch.zeros(1)
        p.requires_grad_(True)
        opt = torch.optim.AdamW([p], lr=1.0, weight_decay=0.0)
        before = 0.0
        for s in range(1, t + 1):
            p.grad = torch.tensor([(0.9 / 0.999) ** (t - s)])
            before = float(p)
            opt.step()
        assert abs(float(p) - before) == pytest.approx(validation.adamw_step_bound(t), rel=1e-5)


def test_plain_sgd_without_dp_is_bounded_by_its_mean_gradient_clip():
    clipped = validation.UpdateBound("sgd", LR, STEPS, BATCH, None, 2 * STEPS, clip=CLIP)
    bound, how = clipped.exact(D * R, N)
    assert bound == pytest.approx(validation.MARGIN * LR * STEPS * CLIP) and "clipped to 1, no noise" in how
    shape, direction = (D, R), np.ones((D, R), np.float32) / np.sqrt(D * R)
    edge = (LR * STEPS * CLIP * direction).astype(np.float32)  # every sample's clipped gradient aligned, every step
    _, stats = _send(_bounded(clipped, shape), GLOBAL, {1: (GLOBAL + edge, {"num-examples": N})})
    assert stats.replies == 1 and not stats.failures
    _, stats = _send(_bounded(clipped, shape), GLOBAL, {1: (GLOBAL + 1.5 * edge, {"num-examples": N})})
    assert stats.replies == 0 and "clipped to 1, no noise" in stats.failures[0]


def test_an_honest_clipped_sgd_update_without_dp_passes_round_one_alone(tiny_model_dir, task_dir, tmp_path):
    # Without DP the bound is lr T C whatever the gradients were: a small honest
    # update x100 may be within it, so the hostile reply here is twice the bound.
    make, answer, s, state, update = _real_round(tiny_model_dir, task_dir, tmp_path, "lora", "sgd", 0.0, "float32")
    norm = np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update.values()))
    assert 0 < norm <= LR * STEPS * 1.0  # dp.max-grad-norm's default, 1
    s.aggregate_train(1, [answer(s, 1)])
    assert s.rounds[1].replies == 1 and not s.rounds[1].failures, s.rounds[1].failures
    hostile = make()
    (msg,) = hostile.configure_train(1, state, ConfigRecord(), FakeGrid([1]))
    hostile.aggregate_train(1, [answer(hostile, 2 * validation.MARGIN * LR * STEPS / norm, request=msg)])
    assert hostile.rounds[1].replies == 0 and "clipped to 1, no noise" in hostile.rounds[1].failures[0]


def test_plain_sgd_without_dp_or_clipping_has_no_bound_round_one_stays_unscreened():
    shape = (D, R)
    assert _bound(epsilon=0.0).limit(D * R, N) is None
    _, stats = _send(_bounded(_bound(epsilon=0.0), shape), GLOBAL, {1: (np.full(shape, 1e3, np.float32), {"num-examples": N})})
    assert stats.replies == 1  # documented: nothing to compare with yet
    # validate.max-norm-ratio = 0 turns the derived bound off with the rest.
    _, stats = _send(_bounded(_bound(), shape, max_norm_ratio=0.0), GLOBAL, {1: (np.full(shape, 1e3, np.float32), {"num-examples": N})})
    assert stats.replies == 1


# Real local training: a node's DP-SGD (or AdamW) reply passes in round 1 alone, x100 of it does not.

LABELS = ("0", "1")


def _real_round(tiny_model_dir, task_dir, tmp_path, strategy, optimizer, epsilon, dtype):
    from fedlora import node, wire
    from fedlora.config import parse_run_config
    from fedlora.model import build_model
    from fedlora.strategies import get_strategy

    node._MODELS.clear()
    node._NODE_DATA.clear()
    run = parse_run_config(
        {
            "model": tiny_model_dir,
            "dataset": task_dir,
            "cache-dir": str(tmp_path / "cache"),
            "strategy": strategy,
            "local-steps": STEPS,
            "batch-size": BATCH,
            "num-server-rounds": 2,
            "dp.epsilon": epsilon,
            "optimizer": optimizer,
            "learning-rate": 0.05 if optimizer == "adamw" else LR,
            "wire.dtype": dtype,
        }
    )
    method = get_strategy(strategy)
    ex = method.exchange
    model = build_model(run, num_labels=2, train_lora_a=method.train_lora_a)
    state = wire.to_arrays(model, wire.global_names(model, ex))

    def strategy_():
        return method(
            payload_shapes={k: tuple(v.shape) for k, v in wire.to_arrays(model, wire.up_names(model, ex)).items()},
            down_keys=wire.down_names(model, ex),
            lora_scale=run.lora.alpha / run.lora.r,
            fingerprint=wire.fingerprint(model, ex),
            min_train_nodes=1,
            min_available_nodes=1,
            max_norm_ratio=run.max_norm_ratio,
            wire_dtype=run.wire_dtype,
            update_bound=validation.UpdateBound.from_run(run),
        )

    rt = node.get_runtime(run, {"partition-id": 0, "num-partitions": 3}, LABELS, method.train_lora_a, method.mixed_ranks)
    s = strategy_()
    (msg,) = s.configure_train(1, state, ConfigRecord(), FakeGrid([1]))
    ledger = node.plan_ledger(rt) if epsilon > 0 else None
    payload, metrics = node.train_round(rt, msg.content["arrays"], 1, ledger, exchange=ex)
    if ledger is not None:
        metrics["noise-multiplier"] = ledger.noise_multiplier
    payload = wire.encode(payload, dtype)
    # Where the node started: what it received, decoded, or (FLoRA's factors) the seeded restart values.
    received = wire.decode(msg.content["arrays"])
    start = {k: (received if k in received else state)[k].numpy() for k in payload.keys()}
    update = {k: wire.decode(payload)[k].numpy() - start[k] for k in payload.keys()}

    def answer(strat, scale, node_id=1, request=None):
        arrays = payload if scale == 1 else ArrayRecord({k: Array((start[k] + scale * update[k]).astype(np.float32)) for k in update})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=request or msg)

    return strategy_, answer, s, state, update


@pytest.mark.parametrize(
    ("strategy", "optimizer", "epsilon", "dtype"),
    [
        ("ffa-lora", "sgd", EPS, "float32"),
        ("ffa-lora", "sgd", EPS, "bfloat16"),
        ("lora", "sgd", EPS, "float16"),
        ("fedsa-lora", "sgd", EPS, "float32"),
        ("fedsvd", "sgd", EPS, "float32"),
        ("flora", "sgd", EPS, "bfloat16"),
        ("fedex-lora", "sgd", EPS, "float32"),
        ("ffa-lora", "adamw", 0.0, "float32"),
        ("lora", "adamw", EPS, "bfloat16"),
    ],
)
def test_an_honest_trained_update_passes_round_one_alone_and_x100_does_not(tiny_model_dir, task_dir, tmp_path, strategy, optimizer, epsilon, dtype):
    make, answer, s, state, update = _real_round(tiny_model_dir, task_dir, tmp_path, strategy, optimizer, epsilon, dtype)
    assert sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update.values()) > 0  # it trained
    s.aggregate_train(1, [answer(s, 1)])
    assert s.rounds[1].replies == 1 and not s.rounds[1].failures, s.rounds[1].failures
    hostile = make()
    (msg,) = hostile.configure_train(1, state, ConfigRecord(), FakeGrid([1]))
    hostile.aggregate_train(1, [answer(hostile, 100, request=msg)])
    stats = hostile.rounds[1]
    assert stats.replies == 0 and len(stats.failures) == 1
    assert stats.failures[0].startswith("node 1:") and "the most an honest update can move" in stats.failures[0]
