"""Config parsing and the start-up checks that name the offending key."""

import tomllib
from pathlib import Path

import pytest

from fedlora.config import DEFAULTS, OPTIONS, STRATEGY_REGISTRY, ConfigError, parse_run_config
from fedlora.strategies import STRATEGIES as REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_pyproject_defaults_match_code_defaults():
    # run_simulation passes an empty run config, so the code's defaults must be pyproject's:
    # the same keys, in the declaration's order, with the same values of the same types.
    app_cfg = _flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert app_cfg == DEFAULTS
    assert list(app_cfg) == list(DEFAULTS)
    assert {k: type(v) for k, v in app_cfg.items()} == {k: type(v) for k, v in DEFAULTS.items()}


def test_registry_and_config_agree_on_strategies():
    # One list: the `strategy` key's choices are the registry the strategy classes fill.
    assert OPTIONS["strategy"].choices is STRATEGY_REGISTRY is REGISTRY
    assert set(REGISTRY) == {"lora", "ffa-lora", "fedex-lora", "flora", "fedsa-lora", "fedsvd"}
    for name in REGISTRY:
        assert parse_run_config({"strategy": name}).strategy == name


def test_defaults_parse():
    run = parse_run_config({})
    assert run.strategy == "ffa-lora"
    assert run.lora.target_modules == ()  # by architecture (model.target_modules)
    assert run.task == "classification" and run.compute.device == "auto" and run.wire_dtype == "float32"
    assert run.dp.enabled and run.dp.delta == 1e-5
    assert run.node_wait_timeout == 300.0 and run.min_train_nodes == 2 and run.train.micro_batch_size == 0
    # The number of simulated nodes is node config (partition-id / num-partitions), not run config.
    assert "num-partitions" not in DEFAULTS and not hasattr(run.partition, "num_partitions")
    with pytest.raises(ConfigError, match="unknown key") as e:
        parse_run_config({"num-partitions": 3})
    assert e.value.key == "num-partitions"


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("strategy", "fedsgd", "must be one of"),
        ("lora.r", 0, ">= 1"),
        ("lora.r", -3, ">= 1"),
        ("lora.r", 2.5, "integer"),
        ("dp.epsilon", -1.0, ">= 0"),
        ("dp.delta", 0.0, "> 0"),
        ("dp.max-grad-norm", 0, ">= 0.001"),
        ("dp.max-grad-norm", 1e-6, ">= 0.001"),
        ("dp.max-grad-norm", -1.0, ">= 0"),
        ("aggregation.max-weight-share", 0, "> 0"),
        ("aggregation.max-weight-share", 1.5, "<= 1"),
        ("partition.method", "random", "must be one of"),
        ("partition.alpha", 0, "> 0"),
        ("fraction-train", 1.5, "<= 1"),
        ("num-server-rounds", 0, ">= 1"),
        ("train-head", "maybe", "true or false"),
        ("device", "gpu", "auto, cpu, mps, cuda or cuda:N"),
        ("device", "cuda:x", "auto, cpu, mps, cuda or cuda:N"),
        ("precision", "fp16", "must be one of"),
        ("task", "seq2seq", "must be one of"),
        ("wire.dtype", "int8", "must be one of"),
        ("eval.max-new-tokens", 0, ">= 1"),
        ("text-columns", "a,b,c", "at most two"),
        ("optimizer", "lbfgs", "must be one of"),
        ("no-such-key", 1, "unknown key"),
        ("aggregation.method", "avg", "must be one of"),
        ("user-dp.mode", "on", "must be one of"),
        ("tracking.wandb-mode", "cloud", "must be one of"),
        ("tracking.backends", "tensorboard,neptune", "unknown tracker"),
        ("node-wait-timeout", 0, "> 0"),
        ("node-wait-timeout", "300", "must be a number"),
        ("micro-batch-size", -1, ">= 0"),
        ("micro-batch-size", 2.5, "integer"),
        ("lora.client-ranks", "2,x", "comma-separated integers"),
        ("lora.client-ranks", "2,9", "1..lora.r (8)"),
    ],
)
def test_bad_values_name_key_and_value(key, value, fragment):
    with pytest.raises(ConfigError) as e:
        parse_run_config({key: value})
    assert e.value.key == key
    assert f"'{key}'" in str(e.value) and repr(value).strip("'") in str(e.value)
    assert fragment in str(e.value)


def test_epsilon_zero_is_non_private():
    assert not parse_run_config({"dp.epsilon": 0}).dp.enabled
    # Without DP, dp.max-grad-norm clips the mean gradient; 0 = not clipped (refused with DP above).
    assert parse_run_config({"dp.epsilon": 0, "dp.max-grad-norm": 0}).dp.max_grad_norm == 0


def test_missing_target_module_fails_at_model_build(tiny_model_dir):
    from fedlora.model import build_model

    run = parse_run_config({"model": tiny_model_dir, "lora.target-modules": "query,q_proj"})
    with pytest.raises(ConfigError) as e:
        build_model(run, num_labels=2, train_lora_a=True)
    assert e.value.key == "lora.target-modules" and "q_proj" in str(e.value)


def test_model_without_classifier_head_fails(tmp_path):
    from transformers import BertConfig, BertModel

    from fedlora.model import build_model, head_names

    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    # AutoModelForSequenceClassification adds a head to an encoder checkpoint, so check a bare module:
    with pytest.raises(ConfigError, match="no classifier head"):
        head_names(BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
    with pytest.raises(ConfigError) as e:
        build_model(parse_run_config({"model": str(tmp_path / "missing")}), 2, True)
    assert e.value.key == "model"


def test_run_name_must_not_escape_the_output_dir():
    with pytest.raises(ConfigError) as e:
        parse_run_config({"run-name": "../elsewhere"})
    assert e.value.key == "run-name"


def test_max_length_beyond_the_model_fails_at_build(tiny_model_dir):
    from fedlora.model import build_model

    with pytest.raises(ConfigError) as e:
        build_model(parse_run_config({"model": tiny_model_dir, "max-length": 4096}), num_labels=2, train_lora_a=False)
    assert e.value.key == "max-length" and "128 positions" in str(e.value)
