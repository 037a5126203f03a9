"""End to end: Flower simulations of each strategy, with and without DP, on a
small learnable task written by the test."""

import glob
import json
import os

import pytest

from conftest import write_task

# Per-method settings, as the paper tunes each method's learning rate separately.
METHOD = {"ffa-lora": {"optimizer": "sgd", "learning-rate": 0.5}, "lora": {"optimizer": "sgd", "learning-rate": 0.5}}


@pytest.fixture(scope="module")
def e2e_task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("e2e-task"), 1200, 200)


def _run(tmp_path, task, **overrides):
    from fedlora.simulation import simulate

    config = {
        "dataset": task,
        "output-dir": str(tmp_path / "out"),
        "cache-dir": str(tmp_path / "cache"),
        "num-server-rounds": 3,
        "local-steps": 10,
        "batch-size": 32,
        "num-partitions": 2,
        "run-name": "run",
        **overrides,
    }
    simulate(config, num_supernodes=2)
    (run_dir,) = glob.glob(str(tmp_path / "out" / "run*"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return run_dir, rows


def _reload_accuracy(run_dir):
    """Accuracy of the saved adapter loaded the standard PEFT way."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora.config import parse_run_config
    from fedlora.data import encode, load_task
    from fedlora.model import apply_pooling, load_tokenizer, resolve_model
    from fedlora.training import evaluate

    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    run = parse_run_config(cfg["run-config"])
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model(run.model)[0], num_labels=len(cfg["data"]["label-names"]))
    assert apply_pooling(base, run) == "mean"  # the default model declares mean pooling (pooling = auto)
    model = PeftModel.from_pretrained(base, os.path.join(run_dir, "adapter"))
    # The adapter names its base model as the run config did, not by this machine's path to it.
    assert json.load(open(os.path.join(run_dir, "adapter", "adapter_config.json")))["base_model_name_or_path"] == cfg["run-config"]["model"]
    task = load_task(run.data)
    data = encode(task.eval, load_tokenizer(run.model), task.text_columns, run.data.max_length)
    with torch.no_grad():
        return evaluate(model, data, 64)["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ffa-lora", "lora"])
@pytest.mark.parametrize("epsilon", [0.0, 3.0], ids=["nodp", "eps3"])
def test_simulation_learns_and_writes_outputs(tmp_path, e2e_task, strategy, epsilon):
    # One of the runs also has the clients evaluate on their local held-out split. Without DP
    # each sample is still clipped (no noise), so the DP rates serve both.
    local_eval = 1.0 if (strategy, epsilon) == ("ffa-lora", 0.0) else 0.0
    run_dir, rows = _run(
        tmp_path,
        e2e_task,
        strategy=strategy,
        **{"dp.epsilon": epsilon, "train-head": True, "fraction-evaluate": local_eval, **METHOD[strategy]},
    )
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        for key in ("round", "strategy", "accuracy", "loss", "epsilon", "bytes_up", "bytes_down", "seconds"):
            assert key in r, key
        assert r["strategy"] == strategy and r["clients"] == 2 and r["failures"] == 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["seconds"] > 0
    final = rows[-1]
    assert final["accuracy"] >= 0.8, rows  # balanced binary task: chance is 0.5
    if local_eval:
        assert final["client_eval_accuracy"] >= 0.8 and final["client_eval_loss"] > 0
    else:
        assert "client_eval_accuracy" not in final
    if epsilon:
        eps = [r["epsilon"] for r in rows[1:]]
        assert eps == sorted(eps) and 0 < eps[0] and eps[-1] <= epsilon  # spent grows, never past the budget
        assert eps[-1] > 0.9 * epsilon  # calibrated to use the budget over the planned rounds
    else:
        assert all(r["epsilon"] == 0 for r in rows)
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["resolved"]["strategy"] == strategy
    tensors = config["payload"]["tensors"]
    assert any(".lora_A." in t for t in tensors) == (strategy == "lora")
    assert _reload_accuracy(run_dir) == pytest.approx(final["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_ffa_lora_uploads_exactly_half_of_lora_with_head_frozen(tmp_path, e2e_task):
    up = {}
    for strategy in ("ffa-lora", "lora"):
        _, rows = _run(tmp_path / strategy, e2e_task, strategy=strategy, **{"train-head": False, "num-server-rounds": 1, "local-steps": 2, "dp.epsilon": 1.0})
        up[strategy] = rows[1]["bytes_up"]
        assert rows[1]["bytes_down"] == up[strategy]  # 2 nodes down, 2 nodes up, same payload
    assert up["ffa-lora"] / up["lora"] == 0.5


@pytest.mark.slow
def test_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, e2e_task, monkeypatch):
    from safetensors.numpy import load_file

    from fedlora import experiment

    # With the moving average on: it is part of the state a resume must restore.
    settings = {"strategy": "ffa-lora", "dp.epsilon": 3.0, "train-head": True, "local-steps": 4, "eval.ema-decay": 0.5, **METHOD["ffa-lora"]}
    straight_dir, straight = _run(tmp_path / "straight", e2e_task, **settings)

    # The same run, interrupted after round 2's checkpoint ...
    original = experiment.Experiment.checkpoint

    def crash_after_round_2(self, server_round):
        original(self, server_round)
        if server_round == 2:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(experiment.Experiment, "checkpoint", crash_after_round_2)
    with pytest.raises(Exception, match="interrupted"):
        _run(tmp_path / "resumed", e2e_task, **settings)
    monkeypatch.undo()
    # ... then started again with resume=true and the same output-dir.
    resumed_dir, resumed = _run(tmp_path / "resumed", e2e_task, resume=True, **settings)

    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight, resumed):
        assert a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"]
        assert a.get("ema_loss") == b.get("ema_loss")
    assert resumed[3]["ema_loss"] != resumed[3]["loss"]  # round 3's average is not round 3's model
    # The privacy ledger survived the restart: the spent epsilon continues, not restarts.
    assert resumed[3]["epsilon"] == pytest.approx(straight[3]["epsilon"], rel=1e-12)
    a = load_file(os.path.join(straight_dir, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(resumed_dir, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_ema_decay_evaluates_and_saves_the_moving_average_of_the_global_adapter(tmp_path, e2e_task, monkeypatch):
    import numpy as np

    from fedlora import experiment

    seen = []
    original = experiment.Experiment.update_ema

    def record(self, arrays):
        seen.append({k: v.numpy().copy() for k, v in arrays.items()})
        out = original(self, arrays)
        seen[-1]["ema"] = {k: v.numpy().copy() for k, v in out.items()}
        return out

    monkeypatch.setattr(experiment.Experiment, "update_ema", record)
    run_dir, rows = _run(tmp_path, e2e_task, **{"strategy": "ffa-lora", "local-steps": 4, "eval.ema-decay": 0.75, **METHOD["ffa-lora"]})
    assert len(seen) == 3 and "ema_accuracy" not in rows[0]  # rounds 1-3; round 0 is the initial model
    # Round 1 starts the average: the same model, the same figures.
    assert rows[1]["ema_accuracy"] == rows[1]["accuracy"] and rows[1]["ema_loss"] == rows[1]["loss"]
    expected = {k: v for k, v in seen[0].items() if k != "ema"}
    for r in seen[1:]:
        expected = {k: 0.75 * expected[k] + 0.25 * r[k] for k in expected}
        for k in expected:
            np.testing.assert_allclose(r["ema"][k], expected[k], rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(seen[-1]["ema"][k], seen[-1][k]) for k in expected)
    assert rows[3]["ema_loss"] != rows[3]["loss"]
    result = json.load(open(os.path.join(run_dir, "result.json")))
    assert result["ema_accuracy"] == rows[3]["ema_accuracy"] and result["best_ema_accuracy"] == max(r["ema_accuracy"] for r in rows[1:])
    assert os.path.isfile(os.path.join(run_dir, "adapter-ema", "adapter_model.safetensors"))


def test_resume_refuses_a_different_config(tmp_path, e2e_task):
    from fedlora.config import ConfigError, parse_run_config
    from fedlora.experiment import Experiment

    common = {"dataset": e2e_task, "output-dir": str(tmp_path), "run-name": "r", "dp.epsilon": 0.0}
    exp = Experiment(parse_run_config(common))
    exp.checkpoint(1)
    with pytest.raises(ConfigError, match=r"different config \(lora"):
        Experiment(parse_run_config({**common, "resume": True, "lora.r": 4}))
    resumed = Experiment(parse_run_config({**common, "resume": True}))
    assert resumed.dir == exp.dir and resumed.start_round == 2


def test_resume_accepts_a_run_that_predates_a_setting_left_at_its_default(tmp_path, e2e_task):
    """A run checkpointed before a config key existed behaved as that key's default."""
    import json

    from fedlora.config import ConfigError, parse_run_config
    from fedlora.experiment import Experiment

    common = {"dataset": e2e_task, "output-dir": str(tmp_path), "run-name": "r", "dp.epsilon": 0.0}
    exp = Experiment(parse_run_config(common))
    exp.checkpoint(1)
    path = os.path.join(exp.dir, "config.json")
    config = json.load(open(path))
    del config["resolved"]["lora"]["client_ranks"], config["resolved"]["user_dp"]  # as written by an older fedlora
    json.dump(config, open(path, "w"))
    assert Experiment(parse_run_config({**common, "resume": True})).start_round == 2
    with pytest.raises(ConfigError, match=r"different config \(user_dp.mode\)"):
        Experiment(parse_run_config({**common, "resume": True, "user-dp.mode": "server-fixed"}))


def test_eval_every_skips_the_servers_evaluation_between_rounds_and_changes_nothing_else(tmp_path, e2e_task):
    from fedlora.tools.report import _curve as _report_curve
    from fedlora.tools.report import find_runs

    settings = {"strategy": "ffa-lora", "local-steps": 4, "num-server-rounds": 4, "eval.ema-decay": 0.75, **METHOD["ffa-lora"]}
    sparse_dir, sparse = _run(tmp_path / "sparse", e2e_task, **settings, **{"eval.every": 3})
    _, each = _run(tmp_path / "each", e2e_task, **settings)
    # Round 0, every third round and the last are evaluated; rounds 1 and 2 are not.
    assert [r["loss"] is None for r in sparse] == [False, True, True, False, False]
    for a, b in zip(sparse, each):
        assert a["epsilon"] == b["epsilon"] and a["bytes_up"] == b["bytes_up"]  # training and privacy as before
        if a["loss"] is None:
            assert a["accuracy"] is None and "ema_accuracy" not in a
        else:  # the same model measured the same: skipping evaluations does not change training or the average
            assert (a["accuracy"], a["loss"], a.get("ema_loss")) == (b["accuracy"], b["loss"], b.get("ema_loss"))
    result = json.load(open(os.path.join(sparse_dir, "result.json")))
    assert result["best_accuracy"] == max(r["accuracy"] for r in sparse if r["accuracy"] is not None)
    # The report's curves plot the evaluated rounds only (not a 0 for the others) ...
    (run,) = find_runs([str(tmp_path / "sparse")])
    xs, ys, _ = _report_curve([run], "round", "accuracy")
    assert xs == [0, 3, 4] and ys == [sparse[i]["accuracy"] for i in (0, 3, 4)]
    # ... and a run stopped after an unevaluated round reports its last evaluated one as final.
    run.rows = sparse[:3]
    assert run.final is sparse[0]


def test_eval_every_must_be_positive():
    from fedlora.config import ConfigError, parse_run_config

    with pytest.raises(ConfigError, match="eval.every"):
        parse_run_config({"eval.every": 0})
