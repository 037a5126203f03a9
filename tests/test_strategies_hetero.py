"""Heterogeneous LoRA ranks: zero-padding (HetLoRA-style), FLoRA's stacking,
and a clear refusal where a method cannot mix ranks."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedlora import node, wire
from fedlora.config import ConfigError, parse_run_config
from fedlora.model import build_model
from fedlora.strategies import FedExLoraStrategy, FfaLoraStrategy, FloraStrategy, LoraStrategy, get_strategy

from conftest import FakeGrid
from conftest import reply as _reply

pytestmark = pytest.mark.usefixtures("server_task_identity")


KA, KB = "layer.lora_A.default.weight", "layer.lora_B.default.weight"
SHAPES = {KA: (2, 3), KB: (3, 2)}  # global rank 2


def _start(strat, state):
    arrays = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in state.items()})
    list(strat.configure_train(1, arrays, ConfigRecord(), FakeGrid()))


A1, B1 = np.array([[1.0, 2.0, 0.0]]), np.array([[1.0], [0.0], [1.0]])  # node 1: rank 1
A2, B2 = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # node 2: rank 2


def test_zero_padding_averages_the_padded_factors_and_counts_the_bytes_sent():
    strat = LoraStrategy(payload_shapes=SHAPES, fingerprint="x")
    _start(strat, {KA: np.zeros((2, 3)), KB: np.zeros((3, 2))})
    out, _ = strat.aggregate_train(1, [_reply(1, {KA: A1, KB: B1}, 1), _reply(2, {KA: A2, KB: B2}, 3)])
    # Node 1's factors get a zero row / column: mean A = [.25 A1 + .75 A2[0]; .75 A2[1]].
    np.testing.assert_allclose(out[KA].numpy(), [[0.25, 1.25, 0.0], [0.0, 0.0, 0.75]])
    np.testing.assert_allclose(out[KB].numpy(), [[1.0, 0.0], [0.0, 0.75], [0.25, 0.0]])
    # Bytes up as received: node 1 sent rank-1 factors, fewer bytes than node 2.
    sizes = [sum(len(Array(np.asarray(x, np.float32)).data) for x in pair) for pair in ((A1, B1), (A2, B2))]
    assert strat.rounds[1].bytes_up == sum(sizes) and sizes[0] < sizes[1]


def test_padding_keeps_fedex_exact_and_flora_stacks_mixed_ranks_exactly():
    # Each client's layer moves by s B_k A_k; the global must move by the weighted mean of those.
    target = 2.0 * (0.25 * B1 @ A1 + 0.75 * B2 @ A2)
    for cls in (FedExLoraStrategy, FloraStrategy):
        strat = cls(payload_shapes=SHAPES, fingerprint="x", lora_scale=2.0)
        _start(strat, {KA: np.zeros((2, 3)), KB: np.zeros((3, 2))})
        out, _ = strat.aggregate_train(1, [_reply(1, {KA: A1, KB: B1}, 1), _reply(2, {KA: A2, KB: B2}, 3)])
        state = {k: out[k].numpy() for k in out.keys()}
        effective = wire.base_delta(state, "layer") + 2.0 * state[KB].astype(np.float64) @ state[KA]
        np.testing.assert_allclose(effective, target, atol=1e-6, err_msg=cls.name)
    # FLoRA's stack holds only the real rank-1 terms, 1 + 2 = 3 (padding dropped): 3 x (3 + 3) > 9 -> dense here.
    u, v = np.ones((3, 1)), np.ones((1, 3))
    state = {}
    wire.add_base_delta(state, "big", np.concatenate([u, np.zeros((3, 1))], axis=1), np.concatenate([v, np.zeros((1, 3))]))
    assert state["big" + wire.DELTA_U].shape == (3, 1)  # the zero (padding) term was dropped


def test_a_reply_above_the_global_rank_is_refused():
    strat = LoraStrategy(payload_shapes=SHAPES, fingerprint="x")
    _start(strat, {KA: np.zeros((2, 3)), KB: np.zeros((3, 2))})
    out, _ = strat.aggregate_train(1, [_reply(1, {KA: np.ones((3, 3)), KB: np.ones((3, 3))}, 1), _reply(2, {KA: A2, KB: B2}, 1)])
    assert any(f.startswith("node 1:") and "shape" in f for f in strat.rounds[1].failures)
    ffa = FfaLoraStrategy(payload_shapes={KB: (3, 2)}, fingerprint="x")
    ffa.aggregate_train(1, [_reply(1, {KB: B1}, 1)])
    assert any(f.startswith("node 1:") and "shape" in f for f in ffa.rounds[1].failures)  # no mixing in FFA-LoRA


def test_a_reply_whose_factors_disagree_on_the_rank_is_refused():
    strat = LoraStrategy(payload_shapes=SHAPES, fingerprint="x")
    _start(strat, {KA: np.zeros((2, 3)), KB: np.zeros((3, 2))})
    out, _ = strat.aggregate_train(1, [_reply(1, {KA: A1, KB: B2}, 1), _reply(2, {KA: A2, KB: B2}, 1)])
    assert strat.rounds[1].failures == [f"node 1: {KA} has rank 1 but {KB} has rank 2"]
    np.testing.assert_allclose(out[KA].numpy(), A2)  # only node 2's reply was used


# -- a lower-rank node's update is what it trained, not the rows it never received ------

A0 = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # global A (rank 2); node 1 keeps row 0 only
DA = np.array([[0.0, 0.3, 0.0]])  # node 1's change to its row of A (norm 0.3; B unchanged)
A1_REPLY, B1_REPLY = A0[:1] + DA, np.zeros((3, 1))
A1_PADDED = np.vstack([A1_REPLY, np.zeros((1, 3))])  # zero-padding (HetLoRA): row 1 was never the node's


def _start_a0(strat, nodes=(1, 2)):
    arrays = ArrayRecord({KA: Array(A0.astype(np.float32)), KB: Array(np.zeros((3, 2), np.float32))})
    list(strat.configure_train(1, arrays, ConfigRecord(), FakeGrid(nodes)))


def test_reference_truncates_and_zero_pads_what_was_sent():
    from fedlora import validation

    sent = {KA: A0, KB: np.arange(6.0).reshape(3, 2)}
    ref = validation.reference(_reply(1, {KA: A1_REPLY, KB: np.zeros((3, 1))}, 1).content, sent)
    np.testing.assert_array_equal(ref[KA], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(ref[KB], [[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    full = validation.reference(_reply(2, sent, 1).content, sent)
    assert full[KA] is sent[KA] and full[KB] is sent[KB]  # a full-rank reply starts where the server sent


def test_norm_screening_measures_a_lower_rank_update_on_its_own_rank():
    # Node 1's update has norm 0.3 like the others'; measured against the full
    # global A it would be sqrt(0.3^2 + 2^2), > 2 x the median: refused before this fix.
    strat = LoraStrategy(payload_shapes=SHAPES, fingerprint="x", max_norm_ratio=2.0)
    _start_a0(strat, (1, 2, 3))
    full = {KA: A0 + [[0.3, 0.0, 0.0], [0.0, 0.0, 0.0]], KB: np.zeros((3, 2))}
    out, _ = strat.aggregate_train(1, [_reply(1, {KA: A1_REPLY, KB: B1_REPLY}, 1), _reply(2, full, 1), _reply(3, full, 1)])
    assert strat.rounds[1].failures == [] and strat.rounds[1].replies == 3
    np.testing.assert_allclose(out[KA].numpy(), (A1_PADDED + 2 * full[KA]) / 3, atol=1e-6)


def test_update_clipping_keeps_a_lower_rank_update_within_the_bound_and_its_padding_zero():
    strat = LoraStrategy(payload_shapes=SHAPES, fingerprint="x", clip_norm=1.0)
    _start_a0(strat)
    big = {KA: A0 + [[0.0, 0.0, 3.0], [0.0, 0.0, 4.0]], KB: np.zeros((3, 2))}  # norm 5: clipped to 1
    out, _ = strat.aggregate_train(1, [_reply(1, {KA: A1_REPLY, KB: B1_REPLY}, 1), _reply(2, big, 1)])
    # Node 1 (norm 0.3 on its rank) is kept as sent, zero row included; node 2 is scaled by 1/5.
    np.testing.assert_allclose(out[KA].numpy(), (A1_PADDED + A0 + [[0.0, 0.0, 0.6], [0.0, 0.0, 0.8]]) / 2, atol=1e-6)


@pytest.mark.parametrize("mode", ["server-fixed", "server-adaptive"])
def test_user_dp_clips_a_lower_rank_update_on_its_own_rank(mode):
    from fedlora import user_dp

    dp = user_dp.UserDP(mode, noise_multiplier=1e-9, clip_norm=1.0, delta=1e-5, num_sampled=2)
    strat = LoraStrategy(payload_shapes=SHAPES, fingerprint="x", user_dp=dp)
    _start_a0(strat)
    big = {KA: A0 + [[0.0, 0.0, 3.0], [0.0, 0.0, 4.0]], KB: np.zeros((3, 2))}  # norm 5: clipped to 1
    out, _ = strat.aggregate_train(1, [_reply(1, {KA: A1_REPLY, KB: B1_REPLY}, 1), _reply(2, big, 1)])
    # The release is mean_k(start_k + clip(update_k)) (+ negligible noise): node 1
    # unclipped with its zero padding, node 2 clipped to norm 1.
    np.testing.assert_allclose(out[KA].numpy(), (A1_PADDED + A0 + [[0.0, 0.0, 0.6], [0.0, 0.0, 0.8]]) / 2, atol=1e-6)
    np.testing.assert_allclose(out[KB].numpy(), np.zeros((3, 2)), atol=1e-6)


def test_client_side_clipping_refuses_a_lower_rank_reply():
    """fixedclipping_mod clips against what the node received (rank r), so a
    rank-r_k reply (a deployed node's ``lora-rank``) is refused, not averaged."""
    from fedlora import user_dp

    dp = user_dp.UserDP("client-fixed", noise_multiplier=1e-9, clip_norm=1.0, delta=1e-5, num_sampled=2)
    strat = LoraStrategy(payload_shapes=SHAPES, fingerprint="x", user_dp=dp)
    _start_a0(strat)
    out, _ = strat.aggregate_train(1, [_reply(1, {KA: A1_REPLY, KB: B1_REPLY}, 1), _reply(2, {KA: A0, KB: np.zeros((3, 2))}, 1)])
    assert out is None and dp.releases == 0  # one valid reply of the two the noise is calibrated for
    assert any(f.startswith("node 1:") and "shape" in f for f in strat.rounds[1].failures)


def test_a_lower_rank_restart_draws_the_first_rows_of_the_full_rank_one(tiny_model_dir):
    """FLoRA restarts A from the seed on every node; the server's reference for a
    rank-r_k node (the first r_k rows of its rank-r draw) is that node's draw."""
    from fedlora.model import init_shared

    run = parse_run_config({"model": tiny_model_dir, "lora.r": 4, "strategy": "flora"})
    import dataclasses

    low = dataclasses.replace(run, lora=dataclasses.replace(run.lora, r=2, alpha=run.lora.alpha / 2))
    full_model, low_model = build_model(run, 2, train_lora_a=True), build_model(low, 2, train_lora_a=True)
    init_shared(full_model, 7)
    init_shared(low_model, 7)
    full, small = wire.to_arrays(full_model), wire.to_arrays(low_model)
    keys = [k for k in full.keys() if ".lora_A." in k]
    assert keys
    for k in keys:
        np.testing.assert_array_equal(small[k].numpy(), full[k].numpy()[:2])


LABELS = ("0", "1")


def test_node_rank_truncates_the_global_factors_and_ffa_refuses(tiny_model_dir, task_dir, tmp_path):
    node._MODELS.clear()
    node._NODE_DATA.clear()
    cfg = {
        "model": tiny_model_dir,
        "dataset": task_dir,
        "cache-dir": str(tmp_path),
        "lora.r": 4,
        "lora.client-ranks": "2,4,4",
        "dp.epsilon": 0.0,
        "local-steps": 1,
        "batch-size": 4,
        "strategy": "lora",
        "learning-rate": 1e-12,
    }  # a step too small to move the factors: the reply shows what the node loaded
    run = parse_run_config(cfg)
    rt = node.get_runtime(run, {"partition-id": 0, "num-partitions": 3}, LABELS, True)
    server = build_model(run, 2, train_lora_a=True)
    a = next(p for n, p in rt.model.named_parameters() if ".lora_A." in n)
    assert a.shape[0] == 2 and rt.run.lora.alpha / rt.run.lora.r == run.lora.alpha / run.lora.r  # same scale
    import torch

    with torch.no_grad():  # a non-zero global B, so truncating it is visible
        for n, p in server.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn_like(p))
    global_arrays = wire.to_arrays(server)
    payload, metrics = node.train_round(rt, global_arrays, 1, None, exchange=get_strategy("lora").exchange)
    key = next(k for k in global_arrays.keys() if ".lora_A." in k)
    assert payload[key].shape == (2, global_arrays[key].shape[1]) and metrics["lora-rank"] == 2
    for k in global_arrays.keys():  # the node kept the first 2 rows of A and the first 2 columns of B
        if ".lora_A." in k:
            np.testing.assert_allclose(payload[k].numpy(), global_arrays[k].numpy()[:2], atol=1e-6)
        elif ".lora_B." in k:
            np.testing.assert_allclose(payload[k].numpy(), global_arrays[k].numpy()[:, :2], atol=1e-6)
    # Node config rank (deployment) must be within 1..lora.r.
    with pytest.raises(ConfigError, match="lora-rank"):
        node.node_rank(run, {"lora-rank": 9})
    # FFA-LoRA cannot mix ranks: the node refuses with the key named.
    with pytest.raises(ConfigError, match="cannot aggregate mixed ranks") as e:
        node.get_runtime(parse_run_config({**cfg, "strategy": "ffa-lora"}), {"partition-id": 0, "num-partitions": 3}, LABELS, False, "")
    assert e.value.key == "lora-rank"
    # Fewer ranks than nodes: the run config cannot know the number of nodes, so the node without an entry refuses.
    short = parse_run_config({**cfg, "lora.client-ranks": "2,4"})
    assert node.node_rank(short, {"partition-id": 1, "num-partitions": 3}) == 4
    with pytest.raises(ConfigError, match="one rank per simulated node") as e:
        node.node_rank(short, {"partition-id": 2, "num-partitions": 3})
    assert e.value.key == "lora.client-ranks"
    with pytest.raises(ConfigError, match=r"1\.\.lora\.r"):
        parse_run_config({**cfg, "lora.client-ranks": "2,8,4"})
