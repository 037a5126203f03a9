"""``fedlora merge``: a run's global adapter (and FedEx-LoRA's base delta)
merged into its base, loadable by plain transformers.

The run folders are written by the server's own code path (``Experiment``:
config.json, then ``finish`` saves the adapter), with random B factors and
head so the adapter changes the model; the reference is the server's PEFT
model itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedlora import wire
from fedlora.config import parse_run_config
from fedlora.tools import cli
from fedlora.tools.merge import MergeError, merge

from conftest import write_jsonl


@pytest.fixture(scope="module")
def lm_task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm-task")
    rows = [{"prompt": f"what comes after {i}", "response": str(i + 1)} for i in range(40)]
    write_jsonl(os.path.join(d, "train.jsonl"), rows[:30])
    write_jsonl(os.path.join(d, "validation.jsonl"), rows[30:])
    return str(d)


def _finished_run(out_dir, run_name, config, *, delta=False, seed=0):
    """A complete run, as the server writes it: random B (and head), optionally
    a FedEx-LoRA base delta; returns the Experiment (its model is the reference)."""
    from fedlora.experiment import Experiment

    cfg = {"output-dir": str(out_dir), "run-name": run_name, "dp.epsilon": 0.0, "tracking.backends": "none", "eval.max-examples": 4, **config}
    exp = Experiment(parse_run_config(cfg))
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in exp.initial_arrays.items():
        v = value.numpy()
        state[key] = rng.normal(0, 0.5, v.shape).astype(np.float32) if ".lora_B." in key or ".modules_to_save." in key else v
    assert any(".lora_B." in k for k in state)
    if delta:
        for layer in sorted({wire.lora_module(k) for k in state if ".lora_A." in k}):
            d_out, d_in = exp.model.get_submodule(layer).base_layer.weight.shape
            wire.add_base_delta(state, layer, rng.normal(0, 0.3, (d_out, 1)), rng.normal(0, 0.3, (1, d_in)))
        assert any(wire.is_delta(k) for k in state)
    arrays = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in state.items()})
    exp.evaluate_round(1, arrays)  # loads them into the server's model, writes the round's metrics
    exp.finish()
    exp.model.eval()
    return exp


def _inputs(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(["the meal was great", "what comes after 7 and then some"], padding=True, return_tensors="pt")


@torch.no_grad()
def _logits(model, inputs):
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_model_dir, task_dir):
    return _finished_run(tmp_path_factory.mktemp("runs"), "cls", {"model": tiny_model_dir, "dataset": task_dir, "strategy": "lora", "train-head": True})


# -- causal LM -------------------------------------------------------------------------


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])  # GQA and tied embeddings; Conv1D (fan_in_fan_out)
def test_causal_lm_merge_equals_the_peft_model_and_loads_without_fedlora_or_peft(tmp_path, model_fixture, lm_task_dir, request):
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(model_fixture)
    exp = _finished_run(tmp_path / "runs", "lm", {"task": "causal-lm", "model": model_dir, "dataset": lm_task_dir})
    out = tmp_path / "merged"
    merge(exp.dir, str(out))

    inputs = _inputs(str(out))  # the tokenizer was saved with the model
    reference = _logits(exp.model, inputs)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, inputs), reference, atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert (_logits(base, inputs) - reference).abs().max() > 1e-3  # the adapter changes the model
    assert not (out / "adapter_config.json").exists()

    # A fresh interpreter with neither fedlora nor peft importable gets the same logits.
    script = (
        "import sys, numpy as np, torch\n"
        "sys.modules['peft'] = None; sys.modules['fedlora'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "x = tok(['the meal was great', 'what comes after 7 and then some'], padding=True, return_tensors='pt')\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    np.save(sys.argv[2], m(input_ids=x['input_ids'], attention_mask=x['attention_mask']).logits.float().numpy())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "logits.npy")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), reference.numpy(), atol=1e-5, rtol=0)


def test_merge_writes_the_requested_dtype(tmp_path, tiny_llama_dir, lm_task_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    exp = _finished_run(tmp_path / "runs", "lm", {"task": "causal-lm", "model": tiny_llama_dir, "dataset": lm_task_dir})
    out = tmp_path / "bf16"
    assert cli.main(["merge", exp.dir, str(out), "--dtype", "bfloat16"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert next(merged.parameters()).dtype == torch.bfloat16
    inputs = _inputs(str(out))
    torch.testing.assert_close(_logits(merged, inputs), _logits(exp.model, inputs), atol=0.1, rtol=0.05)


# -- classification --------------------------------------------------------------------


def test_classifier_merge_keeps_the_trained_head_and_label_names(tmp_path, classifier_run, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    exp = classifier_run
    out = tmp_path / "merged"
    merge(exp.dir, str(out))
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    inputs = _inputs(str(out))
    torch.testing.assert_close(_logits(merged, inputs), _logits(exp.model, inputs), atol=1e-5, rtol=0)

    labels = json.load(open(os.path.join(exp.dir, "config.json")))["data"]["label-names"]
    assert merged.config.id2label == {i: str(n) for i, n in enumerate(labels)} and merged.config.num_labels == len(labels)
    # The head is the trained one from the adapter (modules_to_save), not the base's.
    trained = exp.model.get_parameter("base_model.model.classifier.modules_to_save.default.weight")
    torch.testing.assert_close(merged.classifier.weight, trained.detach(), atol=0, rtol=0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert (merged.get_parameter(q) - base.get_parameter(q)).abs().max() > 1e-3  # LoRA merged into the base weight


def test_fedex_base_delta_is_merged(tmp_path, tiny_model_dir, task_dir):
    from transformers import AutoModelForSequenceClassification

    exp = _finished_run(tmp_path / "runs", "fedex", {"model": tiny_model_dir, "dataset": task_dir, "strategy": "fedex-lora"}, delta=True)
    assert os.path.isfile(os.path.join(exp.dir, "adapter", "base_delta.npz"))
    out = tmp_path / "merged"
    merge(exp.dir, str(out))
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    inputs = _inputs(str(out))
    reference = _logits(exp.model, inputs)
    torch.testing.assert_close(_logits(merged, inputs), reference, atol=1e-5, rtol=0)
    assert json.load(open(out / "fedlora_merge.json"))["base-delta-layers"] == 4
    # Without the delta the model is a different one: the delta mattered.
    wire.set_base_delta(exp.model, {})
    assert (_logits(exp.model, inputs) - reference).abs().max() > 1e-3


def test_base_delta_for_an_unknown_layer_is_refused(tmp_path, classifier_run):
    run = tmp_path / "run"
    shutil.copytree(classifier_run.dir, run)
    np.savez(run / "adapter" / "base_delta.npz", **{"base_model.model.bert.pooler.dense.fedlora_delta": np.zeros((32, 32), np.float32)})
    with pytest.raises(MergeError, match=r"base_delta.npz: base deltas for .*pooler.dense.*not LoRA layers"):
        merge(str(run), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_model_under_the_data_dir_resolves_from_the_environment(tmp_path, tiny_model_dir, task_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data_dir / "models" / "tiny")
    exp = _finished_run(
        tmp_path / "runs", "dd", {"model": str(data_dir / "models" / "tiny"), "dataset": task_dir, "data-dir": str(data_dir), "strategy": "lora"}
    )
    recorded = json.load(open(os.path.join(exp.dir, "config.json")))["resolved"]["model"]
    assert recorded == "$FEDLORA_DATA_DIR/models/tiny"

    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    with pytest.raises(MergeError, match=r"config.json records model = '\$FEDLORA_DATA_DIR/models/tiny'.*set FEDLORA_DATA_DIR"):
        merge(exp.dir, str(tmp_path / "out"))
    monkeypatch.setenv("FEDLORA_DATA_DIR", str(data_dir))
    merge(exp.dir, str(tmp_path / "out"))
    inputs = _inputs(str(tmp_path / "out"))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(merged, inputs), _logits(exp.model, inputs), atol=1e-5, rtol=0)


# -- refusals ----------------------------------------------------------------------------


def test_incomplete_run_is_refused_naming_the_folder(tmp_path, classifier_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(classifier_run.dir, run, ignore=shutil.ignore_patterns("adapter"))
    with pytest.raises(MergeError, match=rf"{run} has no adapter/.*incomplete"):
        merge(str(run), str(tmp_path / "out"))
    (run / "checkpoint.json").write_text("{}")
    assert cli.main(["merge", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"fedlora merge: {run} has no adapter/" in err and "resume=true" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeError, match=r"is not a run folder \(no config.json\)"):
        merge(str(tmp_path), str(tmp_path / "out"))


def test_non_empty_out_dir_needs_force(tmp_path, classifier_run):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard of an earlier save")
    with pytest.raises(MergeError, match=rf"{out} exists and is not empty.*--force"):
        merge(classifier_run.dir, str(out))
    assert sorted(os.listdir(out)) == ["model-00001-of-00002.safetensors", "notes.txt"]
    merge(classifier_run.dir, str(out), force=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    AutoModelForSequenceClassification.from_pretrained(out)
    # An empty folder is fine without --force.
    (tmp_path / "empty").mkdir()
    merge(classifier_run.dir, str(tmp_path / "empty"))
    assert (tmp_path / "empty" / "config.json").is_file()


def test_out_dir_inside_the_run_adapter_is_refused(classifier_run):
    for out in (classifier_run.dir, os.path.join(classifier_run.dir, "adapter")):
        with pytest.raises(MergeError, match="must not be the run folder or its adapter/"):
            merge(classifier_run.dir, out, force=True)
