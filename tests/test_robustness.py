"""One example cannot poison a node's update: an example with a non-finite
gradient contributes zero before clipping, and a node never sends a
non-finite update (its finiteness would tell whether the example was drawn)."""

import numpy as np
import pytest
import torch

from fedlora import node, wire
from fedlora.config import parse_run_config

from conftest import make_rows, write_jsonl


@pytest.fixture
def runtime(tiny_model_dir, tmp_path):
    node._MODELS.clear()
    node._NODE_DATA.clear()
    write_jsonl(tmp_path / "mine" / "train.jsonl", make_rows(16, seed=5))
    run = parse_run_config(
        {
            "model": tiny_model_dir,
            "dataset": str(tmp_path / "mine"),
            "cache-dir": str(tmp_path / "cache"),
            "local-steps": 2,
            "batch-size": 16,
            "num-server-rounds": 1,
            "dp.epsilon": 5.0,
        }
    )
    rt = node.get_runtime(run, {"partition-id": 0, "num-partitions": 1}, ("0", "1"), train_lora_a=False)
    yield rt
    node._MODELS.clear()  # the model below is poisoned: no other test may reuse it
    node._NODE_DATA.clear()


def _poison_one_example(rt):
    """Example 0 gets a token whose embedding is infinite: its loss and gradient are not finite."""
    emb = next(p for n, p in rt.model.named_parameters() if n.endswith("word_embeddings.weight"))
    token = emb.shape[0] - 1
    with torch.no_grad():
        emb[token] = float("inf")
    rt.train_data.tensors["input_ids"][0, 1] = token


def test_an_example_with_an_infinite_gradient_contributes_zero(runtime):
    _poison_one_example(runtime)
    start = wire.to_arrays(runtime.model)
    arrays, metrics = node.train_round(runtime, start, 1, node.plan_ledger(runtime))  # q = 1: example 0 is in every batch
    assert all(np.isfinite(arrays[k].numpy()).all() for k in arrays.keys())
    assert any(not np.array_equal(arrays[k].numpy(), start[k].numpy()) for k in arrays.keys())  # the others still trained
    assert metrics["epsilon"] > 0


def test_zero_nonfinite_examples_clears_only_the_bad_ones():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad_sample = torch.tensor([[1.0, 2, 3], [float("nan"), 0, 0], [1, 1, 1]])
    b.grad_sample = [torch.ones(2, 2, 2), torch.tensor([[[float("inf"), 0], [0, 0]]])]  # accumulated over two passes
    assert node.zero_nonfinite_examples([a, b]) == 2
    assert a.grad_sample[0].tolist() == [1, 2, 3] and not a.grad_sample[1:].any()
    assert b.grad_sample.shape == (3, 2, 2) and b.grad_sample[0].sum() == 4 and not b.grad_sample[1:].any()


def test_a_node_never_sends_a_non_finite_update(runtime, monkeypatch):
    start = wire.to_arrays(runtime.model)
    real = wire.to_arrays

    def corrupted(model, names=None):  # whatever made it non-finite (an overflow, a bug)
        out = real(model, names)
        key = next(iter(out.keys()))
        out[key] = type(out[key])(np.full(out[key].shape, np.nan, np.float32))
        return out

    monkeypatch.setattr(wire, "to_arrays", corrupted)
    with pytest.raises(node.NonFiniteUpdate):
        node.train_round(runtime, start, 1, node.plan_ledger(runtime))
