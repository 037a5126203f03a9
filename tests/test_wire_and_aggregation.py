"""What crosses the wire, and the aggregation math of each strategy."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedlora import wire
from fedlora.config import parse_run_config
from fedlora.model import build_model, is_lora_a
from fedlora.node import FingerprintMismatch, NodeRuntime, check_fingerprint
from fedlora.strategies import FfaLoraStrategy, LoraStrategy

pytestmark = pytest.mark.usefixtures("server_task_identity")  # Flower messages outside a SuperLink


def _model(tiny_model_dir, train_lora_a, train_head=False, seed=42):
    run = parse_run_config({"model": tiny_model_dir, "train-head": train_head, "seed": seed})
    return build_model(run, num_labels=2, train_lora_a=train_lora_a)


def test_ffa_payload_has_no_a_and_half_the_bytes(tiny_model_dir):
    lora, ffa = _model(tiny_model_dir, True), _model(tiny_model_dir, False)
    lora_keys, ffa_keys = set(wire.to_arrays(lora).keys()), set(wire.to_arrays(ffa).keys())
    assert not any(".lora_A." in k for k in ffa_keys)
    assert all(".lora_B." in k for k in ffa_keys)
    assert {k for k in lora_keys if ".lora_A." in k} and ffa_keys < lora_keys
    # Square targets (query/value): A and B have the same size, so exactly half.
    assert wire.nbytes(wire.to_arrays(ffa)) / wire.nbytes(wire.to_arrays(lora)) == 0.5


def test_head_travels_only_when_it_trains(tiny_model_dir):
    keys = set(wire.to_arrays(_model(tiny_model_dir, False, train_head=True)).keys())
    assert any(".modules_to_save." in k for k in keys)
    assert not any(".modules_to_save." in k for k in wire.to_arrays(_model(tiny_model_dir, False)).keys())


def test_fingerprint_identical_across_nodes_and_sensitive_to_a(tiny_model_dir):
    a, b = _model(tiny_model_dir, False), _model(tiny_model_dir, False)
    assert wire.fingerprint(a) == wire.fingerprint(b)
    assert wire.fingerprint(_model(tiny_model_dir, False, seed=7)) != wire.fingerprint(a)
    with torch.no_grad():
        next(p for n, p in b.named_parameters() if is_lora_a(n))[0, 0] += 1e-3
    assert wire.fingerprint(a) != wire.fingerprint(b)
    rt = NodeRuntime(None, b, None, None, 0, False)
    with pytest.raises(FingerprintMismatch, match="refusing to train"):
        check_fingerprint(rt, wire.fingerprint(a))


def test_load_arrays_rejects_foreign_payloads(tiny_model_dir):
    ffa, lora = _model(tiny_model_dir, False), _model(tiny_model_dir, True)
    with pytest.raises(wire.PayloadError, match="unexpected"):
        wire.load_arrays(ffa, wire.to_arrays(lora))
    arrays = wire.to_arrays(ffa)
    key = next(iter(arrays.keys()))
    arrays[key] = Array(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(wire.PayloadError, match="shape"):
        wire.load_arrays(ffa, arrays)


# -- aggregation math on hand-sized tensors --------------------------------------

RNG = np.random.default_rng(0)
D, R = 6, 2
SHARED_A = RNG.normal(size=(R, D)).astype(np.float32)
KA, KB = "layer.lora_A.default.weight", "layer.lora_B.default.weight"


def _reply(node: int, arrays: dict, n: int) -> Message:
    request = Message(RecordDict({}), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "epsilon": 0.5 * node, "train-loss": 1.0}),
        }
    )
    return Message(content, reply_to=request)


def test_ffa_lora_aggregation_is_exact():
    bs = [RNG.normal(size=(D, R)).astype(np.float32) for _ in range(3)]
    ns = [10, 30, 60]
    strat = FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x")
    arrays, metrics = strat.aggregate_train(1, [_reply(i + 1, {KB: b}, n) for i, (b, n) in enumerate(zip(bs, ns))])
    w = np.array(ns) / sum(ns)
    mean_of_products = sum(wk * (b @ SHARED_A) for wk, b in zip(w, bs))
    np.testing.assert_allclose(arrays[KB].numpy() @ SHARED_A, mean_of_products, rtol=1e-5, atol=1e-6)
    assert metrics["epsilon"] == 1.5  # privacy spent: the max over clients, not a mean
    # Bytes as serialised on the wire: the tensor data plus each array's small .npy header.
    assert strat.rounds[1].bytes_up == sum(len(Array(b).data) for b in bs)
    assert 3 * bs[0].nbytes < strat.rounds[1].bytes_up < 3 * bs[0].nbytes + 3 * 256


def test_vanilla_lora_aggregation_is_inexact_on_a_small_example():
    # Two clients, equal weight: mean(B)·mean(A) differs from mean(B·A).
    a1, a2 = np.eye(R, D, dtype=np.float32), np.eye(R, D, k=2, dtype=np.float32)
    b1, b2 = np.ones((D, R), np.float32), -np.ones((D, R), np.float32)
    strat = LoraStrategy(payload_shapes={KA: (R, D), KB: (D, R)}, fingerprint="x")
    arrays, _ = strat.aggregate_train(1, [_reply(1, {KA: a1, KB: b1}, 5), _reply(2, {KA: a2, KB: b2}, 5)])
    np.testing.assert_allclose(arrays[KA].numpy(), (a1 + a2) / 2)
    np.testing.assert_allclose(arrays[KB].numpy(), (b1 + b2) / 2)
    product_of_means = arrays[KB].numpy() @ arrays[KA].numpy()  # zero: B averages to 0
    mean_of_products = (b1 @ a1 + b2 @ a2) / 2  # not zero
    assert np.abs(product_of_means).max() == 0
    assert np.abs(mean_of_products - product_of_means).max() == pytest.approx(0.5)


def test_ffa_strategy_refuses_a_reply_carrying_a_and_names_the_node():
    strat = FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x")
    good = _reply(1, {KB: np.ones((D, R), np.float32)}, 10)
    bad = _reply(7, {KB: np.zeros((D, R), np.float32), KA: SHARED_A}, 10)
    request = Message(RecordDict({}), dst_node_id=9, message_type="train")
    failed = Message(Error(code=0, reason="privacy budget exhausted"), reply_to=request)
    arrays, _ = strat.aggregate_train(3, [good, bad, failed])
    np.testing.assert_array_equal(arrays[KB].numpy(), np.ones((D, R)))  # only the good reply counts
    failures = strat.rounds[3].failures
    assert any(f.startswith("node 7:") and "unexpected" in f and "lora_A" in f for f in failures)
    assert any(f.startswith("node 9:") and "budget" in f for f in failures)
    assert strat.rounds[3].replies == 1


def test_fingerprint_covers_the_pretrained_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    other = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # same architecture, a different checkpoint
        other.bert.encoder.layer[0].attention.self.key.weight.mul_(1.01)
    other.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    mine = _model(tiny_model_dir, False, train_head=True)
    theirs = build_model(parse_run_config({"model": str(tmp_path), "train-head": True}), num_labels=2, train_lora_a=False)
    assert wire.fingerprint(mine) != wire.fingerprint(theirs)
    assert wire.fingerprint(mine) == wire.fingerprint(_model(tiny_model_dir, False, train_head=True))


def test_reported_epsilon_is_cumulative_over_nodes_that_sat_out():
    # With partial participation a round's repliers may have spent less than others.
    strat = FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x")
    b = np.ones((D, R), np.float32)
    strat.aggregate_train(1, [_reply(4, {KB: b}, 10)])  # node 4 reports epsilon 2.0
    strat.aggregate_train(2, [_reply(1, {KB: b}, 10)])  # only node 1 (epsilon 0.5) this round
    assert strat.rounds[2].epsilon == 2.0
