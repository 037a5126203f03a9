"""Aggregation math of FedEx-LoRA, FLoRA, FedSA-LoRA and FedSVD on small
hand-checkable tensors, and what each method puts on the wire."""

import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedlora import wire
from fedlora.config import ConfigError, parse_run_config
from fedlora.model import build_model, is_lora_a
from fedlora.strategies import (
    FedExLoraStrategy,
    FedSaLoraStrategy,
    FedSvdStrategy,
    FloraStrategy,
    get_strategy,
)
from fedlora.strategies.fedsvd import refactor

from conftest import FakeGrid, reply

pytestmark = pytest.mark.usefixtures("server_task_identity")


M = "layer"  # one LoRA layer
KA, KB = f"{M}.lora_A.default.weight", f"{M}.lora_B.default.weight"


def _reply(node: int, arrays: dict, n: int) -> Message:
    return reply(node, arrays, n, epsilon=0.0)


def _start(strat, server_round: int, state: dict, nodes=(1, 2)) -> list[Message]:
    """configure_train from ``state``: the strategy records the round's start and counts bytes down."""
    arrays = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in state.items()})
    return list(strat.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(list(nodes))))


def _np(arrays: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in arrays.items()}


def _e(i: int, d: int = 4) -> np.ndarray:
    return np.eye(1, d, i, dtype=np.float32)  # row vector e_i


# -- FedEx-LoRA ------------------------------------------------------------------


def test_fedex_folds_the_residual_into_the_base_by_hand():
    # Client 1: B1 A1 = E11; client 2: B2 A2 = E22; equal weights; scale alpha/r = 2.
    strat = FedExLoraStrategy(payload_shapes={KA: (1, 4), KB: (4, 1)}, fingerprint="x", lora_scale=2.0)
    _start(strat, 1, {KA: np.zeros((1, 4)), KB: np.zeros((4, 1))})
    out, _ = strat.aggregate_train(1, [_reply(1, {KA: _e(0), KB: _e(0).T}, 5), _reply(2, {KA: _e(1), KB: _e(1).T}, 5)])
    out = _np(out)
    np.testing.assert_allclose(out[KA], [[0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(out[KB], [[0.5], [0.5], [0], [0]])
    # residual = mean(BA) - mean(B) mean(A) = [[.25, -.25], [-.25, .25]] (top-left block), times 2.
    expected = np.zeros((4, 4))
    expected[:2, :2] = [[0.5, -0.5], [-0.5, 0.5]]
    np.testing.assert_allclose(wire.base_delta(out, M), expected, atol=1e-7)
    # The global layer W + delta + s B A equals W + s mean_k(B_k A_k) = W + E11 + E22: exact.
    np.testing.assert_allclose(wire.base_delta(out, M) + 2 * out[KB] @ out[KA], np.diag([1, 1, 0, 0]), atol=1e-7)


def test_fedex_is_exact_weighted_and_cumulative_and_sends_the_smaller_form():
    rng = np.random.default_rng(0)
    d_out, d_in, r, s = 20, 30, 1, 0.5
    shapes = {KA: (r, d_in), KB: (d_out, r)}
    strat = FedExLoraStrategy(payload_shapes=shapes, fingerprint="x", lora_scale=s)
    state = {KA: rng.normal(size=(r, d_in)), KB: np.zeros((d_out, r))}
    for rnd in (1, 2, 3):
        before = wire.base_delta(state, M)
        before = 0 if before is None else before
        messages = _start(strat, rnd, state)
        clients = [{k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()} for _ in range(2)]
        ns = [10, 30]
        out, _ = strat.aggregate_train(rnd, [_reply(i + 1, c, n) for i, (c, n) in enumerate(zip(clients, ns))])
        state = _np(out)
        # Every client starts from the same base W + delta; client k ends at W + delta + s B_k A_k.
        # Exact: the new global layer W + delta' + s mean(B) mean(A) is the weighted mean of those.
        mean_of_clients = before + sum(n / 40 * s * c[KB].astype(np.float64) @ c[KA] for c, n in zip(clients, ns))
        effective = wire.base_delta(state, M) + s * state[KB].astype(np.float64) @ state[KA]
        np.testing.assert_allclose(effective, mean_of_clients, rtol=1e-5, atol=1e-5)
        # Rank (2 clients + 1) x r = 3 per round: 3t x (20 + 30) < 20 x 30 for t <= 3 -> stacked factors,
        # which are what goes down (from round 2 on; round 1 starts from the pretrained base).
        assert M + wire.DELTA not in state and state[M + wire.DELTA_U].shape == (d_out, 3 * rnd)
        sent = messages[0].content["arrays"]
        assert (M + wire.DELTA_U in sent.keys()) == (rnd > 1)
        assert strat.rounds[rnd].bytes_down == 2 * wire.nbytes(sent)
    # A fourth round passes the break-even rank (12 x 50 = 600): dense from then on.
    _start(strat, 4, state)
    out, _ = strat.aggregate_train(4, [_reply(i, {k: rng.normal(size=v) for k, v in shapes.items()}, 1) for i in (1, 2)])
    assert set(k for k in out.keys() if wire.is_delta(k)) == {M + wire.DELTA} and out[M + wire.DELTA].shape == (d_out, d_in)


def test_exact_methods_refuse_robust_aggregation():
    for cls in (FedExLoraStrategy, FloraStrategy):
        with pytest.raises(ConfigError, match="aggregation.method"):
            cls(payload_shapes={KA: (1, 4)}, fingerprint="x", aggregation="median")
    FedSvdStrategy(payload_shapes={KB: (4, 1)}, fingerprint="x", aggregation="median")  # B only: fine


# -- FLoRA -----------------------------------------------------------------------


def test_flora_stacks_exactly_and_restarts_the_factors():
    a0 = np.full((1, 4), 0.3, np.float32)
    strat = FloraStrategy(payload_shapes={KA: (1, 4), KB: (4, 1)}, down_keys=[], fingerprint="x", lora_scale=2.0)
    messages = _start(strat, 1, {KA: a0, KB: np.zeros((4, 1))})
    assert list(messages[0].content["arrays"].keys()) == []  # nothing to send before any merge (head frozen)
    out, _ = strat.aggregate_train(1, [_reply(1, {KA: _e(0), KB: _e(0).T}, 1), _reply(2, {KA: _e(1), KB: 3 * _e(1).T}, 3)])
    out = _np(out)
    # s (w1 B1 A1 + w2 B2 A2) = 2 (E11 / 4 + 3 * 3 E22 / 4) = diag(.5, 4.5, 0, 0): rank 2 (stacked r=1 x 2 clients)
    np.testing.assert_allclose(wire.base_delta(out, M), np.diag([0.5, 4.5, 0, 0]), atol=1e-7)
    assert M + wire.DELTA in out  # rank 2 x (4 + 4) is not fewer values than 4 x 4: dense
    np.testing.assert_array_equal(out[KA], a0)  # the global factors stay at the restart values
    np.testing.assert_array_equal(out[KB], 0)
    # Round 2 sends the merged update down, and adds to it.
    messages = _start(strat, 2, out)
    assert set(messages[0].content["arrays"].keys()) == {k for k in out if wire.is_delta(k)}
    out2, _ = strat.aggregate_train(2, [_reply(1, {KA: _e(2), KB: _e(2).T}, 1)])
    np.testing.assert_allclose(wire.base_delta(_np(out2), M), np.diag([0.5, 4.5, 2, 0]), atol=1e-7)


# -- FedSA-LoRA ------------------------------------------------------------------


def test_fedsa_averages_a_only_and_refuses_a_b_upload():
    strat = FedSaLoraStrategy(payload_shapes={KA: (1, 4)}, down_keys=[KA], fingerprint="x")
    messages = _start(strat, 1, {KA: np.zeros((1, 4))}, nodes=(1, 2, 3))
    assert list(messages[0].content["arrays"].keys()) == [KA]
    good = [_reply(1, {KA: _e(0)}, 1), _reply(2, {KA: _e(1)}, 3)]
    leaky = _reply(3, {KA: _e(2), KB: _e(2).T}, 1)  # a node that sends its personal B
    out, _ = strat.aggregate_train(1, good + [leaky])
    np.testing.assert_allclose(out[KA].numpy(), [[0.25, 0.75, 0, 0]])
    assert KB not in out.keys()
    assert any(f.startswith("node 3:") and "lora_B" in f for f in strat.rounds[1].failures)


# -- FedSVD ----------------------------------------------------------------------


def test_fedsvd_refactors_by_hand():
    a = np.array([[2, 0, 0], [0, 1, 0]], np.float32)  # r=2, d_in=3
    b = np.array([[1, 0], [0, 3], [0, 0]], np.float32)  # d_out=3
    new_b, new_a = refactor(b, a)
    # B A = diag(2, 3, 0): singular values 3 and 2, right singular vectors e2 and e1.
    np.testing.assert_allclose(new_b @ new_a, np.diag([2, 3, 0]), atol=1e-6)
    np.testing.assert_allclose(np.abs(new_a), [[0, 1, 0], [1, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(new_b, axis=0), [3, 2], atol=1e-6)


def test_fedsvd_aggregation_is_exact_and_redistributes_an_orthonormal_a():
    rng = np.random.default_rng(1)
    d_out, d_in, r = 5, 7, 2
    strat = FedSvdStrategy(payload_shapes={KB: (d_out, r)}, down_keys=[KA, KB], fingerprint="x")
    a = rng.normal(size=(r, d_in)).astype(np.float32)
    messages = _start(strat, 1, {KA: a, KB: np.zeros((d_out, r))}, nodes=(1, 2, 3))
    assert set(messages[0].content["arrays"].keys()) == {KA, KB}  # A goes down, only B comes back
    bs, ns = [rng.normal(size=(d_out, r)) for _ in range(3)], [1, 2, 5]
    out, _ = strat.aggregate_train(1, [_reply(i + 1, {KB: b}, n) for i, (b, n) in enumerate(zip(bs, ns))])
    new_a, new_b = out[KA].numpy(), out[KB].numpy()
    mean_of_products = sum(n / 8 * b.astype(np.float32) @ a for b, n in zip(bs, ns))
    np.testing.assert_allclose(new_b @ new_a, mean_of_products, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_a @ new_a.T, np.eye(r), atol=1e-6)


# -- the wire, per method, on the tiny model ----------------------------------------


def _model(tiny_model_dir, strategy, train_head=False):
    run = parse_run_config({"model": tiny_model_dir, "train-head": train_head, "strategy": strategy})
    return build_model(run, num_labels=2, train_lora_a=get_strategy(strategy).train_lora_a)


def _kinds(names):
    return {"A" if ".lora_A." in n else "B" if ".lora_B." in n else "head" for n in names}


@pytest.mark.parametrize(
    "strategy, down, up",
    [
        ("lora", {"A", "B", "head"}, {"A", "B", "head"}),
        ("ffa-lora", {"B", "head"}, {"B", "head"}),
        ("fedex-lora", {"A", "B", "head"}, {"A", "B", "head"}),
        ("flora", {"head"}, {"A", "B", "head"}),
        ("fedsa-lora", {"A", "head"}, {"A", "head"}),
        ("fedsvd", {"A", "B", "head"}, {"B", "head"}),
    ],
)
def test_what_each_method_sends(tiny_model_dir, strategy, down, up):
    model, ex = _model(tiny_model_dir, strategy, train_head=True), get_strategy(strategy).exchange
    assert _kinds(wire.down_names(model, ex)) == down and _kinds(wire.up_names(model, ex)) == up
    assert _kinds(wire.personal_names(model, ex)) == ({"B"} if strategy == "fedsa-lora" else set())


def test_fedsvd_fingerprint_ignores_the_server_sent_a_but_ffa_checks_it(tiny_model_dir):
    for strategy, sensitive in (("fedsvd", False), ("ffa-lora", True)):
        model, ex = _model(tiny_model_dir, strategy), get_strategy(strategy).exchange
        before = wire.fingerprint(model, ex)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if is_lora_a(n)).add_(1.0)
        assert (wire.fingerprint(model, ex) != before) == sensitive, strategy


def test_node_and_server_hold_the_same_merged_model(tiny_model_dir):
    """A node loading FLoRA's down payload and the server loading the global
    state have the same layers: base + merged delta, factors at the restart."""
    node_model, server_model = _model(tiny_model_dir, "flora"), _model(tiny_model_dir, "flora")
    ex = get_strategy("flora").exchange
    state = {k: v.numpy() for k, v in wire.to_arrays(server_model, wire.global_names(server_model, ex)).items()}
    layer = wire.lora_module(next(k for k in state if ".lora_A." in k))
    rng = np.random.default_rng(2)
    wire.add_base_delta(state, layer, rng.normal(size=(32, 2)), rng.normal(size=(2, 32)))
    fp = wire.fingerprint(node_model, ex)
    with torch.no_grad():  # the node trained last round: its factors moved
        for n, p in node_model.named_parameters():
            if ".lora_" in n:
                p.add_(0.1)
    arrays = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in state.items()})
    wire.load_down(node_model, ArrayRecord({k: arrays[k] for k in arrays.keys() if wire.is_delta(k)}), ex, seed=42)
    wire.load_global(server_model, arrays, ex)
    for (n, p), (_, q) in zip(node_model.named_parameters(), server_model.named_parameters()):
        assert torch.equal(p, q), n
    base = dict(node_model.named_parameters())[f"{layer}.base_layer.weight"]
    pretrained = _model(tiny_model_dir, "flora").get_parameter(f"{layer}.base_layer.weight")
    np.testing.assert_allclose((base - pretrained).detach().numpy(), wire.base_delta(state, layer), atol=1e-6)
    assert wire.fingerprint(node_model, ex) == fp  # the merged base does not change the fingerprint
    wire.load_down(node_model, ArrayRecord({}), ex, seed=42)  # no delta: back to the pretrained base
    assert torch.equal(base, pretrained)


def test_checkpoint_keeps_the_merged_base_update_and_resume_restores_it(tiny_model_dir, task_dir, tmp_path):
    """FedEx-LoRA's server state is its global arrays plus the cumulative base
    update: both are in the checkpoint, and a resumed run evaluates with them."""
    from fedlora.experiment import Experiment

    common = {"model": tiny_model_dir, "dataset": task_dir, "output-dir": str(tmp_path), "run-name": "r", "dp.epsilon": 0.0, "strategy": "fedex-lora"}
    exp = Experiment(parse_run_config(common))
    state = {k: v.numpy() for k, v in exp.initial_arrays.items()}
    layer = wire.lora_module(next(k for k in state if ".lora_A." in k))
    wire.add_base_delta(state, layer, np.ones((32, 1)), np.full((1, 32), 0.01))
    arrays = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in state.items()})
    exp.evaluate_round(0, arrays)
    exp.make_strategy()
    exp.checkpoint(1)
    resumed = Experiment(parse_run_config({**common, "resume": True}))
    assert resumed.start_round == 2
    assert set(resumed.initial_arrays.keys()) == set(arrays.keys()) and any(wire.is_delta(k) for k in arrays.keys())
    resumed.evaluate_round(1, resumed.initial_arrays)
    base = resumed.model.get_parameter(f"{layer}.base_layer.weight")
    pretrained = _model(tiny_model_dir, "fedex-lora").get_parameter(f"{layer}.base_layer.weight")
    np.testing.assert_allclose((base - pretrained).detach().numpy(), 0.01, atol=1e-6)


def test_fedsa_node_keeps_its_own_b_across_rounds(tiny_model_dir, task_dir, tmp_path):
    """A FedSA-LoRA node trains round t from the B it saved after round t-1
    (on disk: a fresh process per round finds it), by round number."""
    from fedlora import node
    from fedlora.config import cache_dir
    from fedlora.node_store import NodeStore

    node._MODELS.clear()
    node._NODE_DATA.clear()
    run = parse_run_config(
        {
            "model": tiny_model_dir,
            "dataset": task_dir,
            "cache-dir": str(tmp_path),
            "strategy": "fedsa-lora",
            "dp.epsilon": 0.0,
            "local-steps": 3,
            "batch-size": 8,
            "learning-rate": 0.5,
        }
    )
    ex = get_strategy("fedsa-lora").exchange
    rt = node.get_runtime(run, {"partition-id": 0, "num-partitions": 3}, ("0", "1"), True)
    global_arrays = wire.to_arrays(rt.model, wire.down_names(rt.model, ex))
    store = NodeStore(cache_dir(rt.run), "run-key", "node-0")
    pdir = store.personal_dir
    assert store.load_personal(0) is None  # round 1 starts from B = 0
    node.train_round(rt, global_arrays, 1, None, exchange=ex, personal=None)
    b_after_1 = wire.to_arrays(rt.model, wire.personal_names(rt.model, ex))
    assert any(np.abs(v.numpy()).max() > 0 for v in b_after_1.values())  # B trained
    store.save_personal(1, b_after_1)
    # Round 2, as a fresh process would: load by round, train with a step too small to move B.
    tiny = parse_run_config({**run.raw, "learning-rate": 1e-12})
    rt2 = node.get_runtime(tiny, {"partition-id": 0, "num-partitions": 3}, ("0", "1"), True)
    node.train_round(rt2, global_arrays, 2, None, exchange=ex, personal=store.load_personal(1))
    for k, v in wire.to_arrays(rt2.model, wire.personal_names(rt2.model, ex)).items():
        np.testing.assert_allclose(v.numpy(), b_after_1[k].numpy(), atol=1e-6)
    store.save_personal(2, b_after_1)
    store.save_personal(3, b_after_1)
    assert sorted(os.listdir(pdir)) == ["2.npz", "3.npz"]  # the current and the previous round only
