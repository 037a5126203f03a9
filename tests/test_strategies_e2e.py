"""End to end, under DP: a Flower simulation of each of FedEx-LoRA, FLoRA,
FedSA-LoRA and FedSVD on the small learnable task, with their bytes per round."""

import glob
import json
import os

import numpy as np
import pytest

from conftest import write_task

pytestmark = pytest.mark.slow  # end-to-end simulations: `pytest -m "not slow"` skips them

SETTINGS = {
    "num-server-rounds": 3,
    "local-steps": 10,
    "batch-size": 32,
    "num-partitions": 2,
    "run-name": "run",
    "dp.epsilon": 3.0,
    "train-head": True,
    "optimizer": "sgd",
    "learning-rate": 0.5,
}


@pytest.fixture(scope="module")
def e2e_task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("e2e-task"), 1200, 200)


def _run(tmp_path, task, **overrides):
    from fedlora.simulation import simulate

    simulate({"dataset": task, "output-dir": str(tmp_path / "out"), "cache-dir": str(tmp_path / "cache"), **SETTINGS, **overrides}, num_supernodes=2)
    (run_dir,) = glob.glob(str(tmp_path / "out" / "run*"))
    return run_dir, [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _check_common(rows, strategy):
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert r["strategy"] == strategy and r["clients"] == 2 and r["failures"] == 0, r["failure_reasons"]
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    eps = [r["epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and 0.9 * 3.0 < eps[-1] <= 3.0  # sample-level DP, calibrated to the budget


@pytest.mark.parametrize("strategy", ["fedex-lora", "flora", "fedsvd"])
def test_exact_strategies_learn_under_dp(tmp_path, e2e_task, strategy):
    # FLoRA runs with heterogeneous ranks (node 0: rank 4, node 1: rank 8), which its stacking aggregates.
    hetero = {"lora.client-ranks": "4,8"} if strategy == "flora" else {}
    run_dir, rows = _run(tmp_path, e2e_task, strategy=strategy, **hetero)
    _check_common(rows, strategy)
    ranks = sorted(m["lora-rank"] for m in rows[1]["client_metrics"].values())
    assert ranks == ([4, 8] if hetero else [8, 8])
    assert rows[-1]["accuracy"] >= 0.8, [r["accuracy"] for r in rows]  # balanced binary task: chance is 0.5
    r1, r2 = rows[1], rows[2]
    if strategy == "fedex-lora":
        # Round 1 starts from the pretrained base: down = up (A, B, head; 2 nodes each way).
        # From round 2 the merged base update goes down too.
        assert r1["bytes_down"] == r1["bytes_up"] and r2["bytes_down"] > r2["bytes_up"]
    elif strategy == "flora":
        # Down: the head, then the head and the merged update; never the factors.
        assert r1["bytes_down"] < r1["bytes_up"] and r2["bytes_down"] > r1["bytes_down"]
    else:
        # FedSVD sends A, B (and the head) down; only B (and the head) comes back.
        assert r1["bytes_down"] > r1["bytes_up"] and r2["bytes_down"] == r1["bytes_down"]
    adapter = os.path.join(run_dir, "adapter")
    assert os.path.exists(os.path.join(adapter, "base_delta.npz")) == (strategy != "fedsvd")


def test_fedsa_keeps_b_on_the_nodes_and_evaluates_personalised_models(tmp_path, e2e_task):
    run_dir, rows = _run(tmp_path, e2e_task, strategy="fedsa-lora", **{"fraction-evaluate": 1.0})
    _check_common(rows, "fedsa-lora")
    final = rows[-1]
    # Personalised models (mean A + each node's own B) on the nodes' held-out splits.
    assert final["client_eval_accuracy"] >= 0.8, [r.get("client_eval_accuracy") for r in rows]
    # Down: A + head; up: A + head: the same payload both ways (train + evaluate messages down).
    assert final["bytes_up"] > 0 and "accuracy" in final
    # Each node's B lives in its state directory, one file per recent round, never on the server.
    personal = glob.glob(str(tmp_path / "cache" / "personal" / "*" / "*.npz"))
    assert len(personal) == 2 * 2  # 2 nodes x (rounds 2 and 3)
    with np.load(personal[0]) as npz:
        assert npz.files and all(".lora_B." in k for k in npz.files) and any(np.abs(npz[k]).max() > 0 for k in npz.files)
    with np.load(glob.glob(os.path.join(run_dir, "checkpoint-round*.npz"))[0]) as ckpt:
        assert not any(".lora_B." in k for k in ckpt.files)


def test_user_level_dp_on_top_of_sample_level_dp(tmp_path, e2e_task):
    """FFA-LoRA with clients clipping their updates (Flower's fixedclipping_mod)
    and the server adding central noise: both epsilons are reported."""
    from fedlora.user_dp import user_epsilon

    z = 0.5
    run_dir, rows = _run(
        tmp_path,
        e2e_task,
        strategy="ffa-lora",
        **{
            "num-server-rounds": 2,
            "user-dp.mode": "client-fixed",
            "user-dp.noise-multiplier": z,
            "user-dp.clip-norm": 0.5,
        },
    )
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["failures"] == 0 for r in rows[1:])
    for t, r in enumerate(rows[1:], start=1):
        assert r["user_epsilon"] == pytest.approx(user_epsilon(z, t, 1e-5))  # one release per round
        assert 0 < r["epsilon"] <= 3.0  # the clients' sample-level DP-SGD budget, as before
    ckpt = json.load(open(os.path.join(run_dir, "checkpoint.json")))
    assert ckpt["strategy-state"]["user-dp"] == {"releases": 2, "clip-norm": 0.5}
