"""model-dropout: the pretrained model's own dropout rates, set by the run config."""

import pytest
import torch
from torch import nn

from fedlora import node
from fedlora.config import ConfigError, parse_run_config
from fedlora.model import build_model


def _model(directory, task="classification", **extra):
    run = parse_run_config({"model": directory, "task": task, **extra})
    return build_model(run, num_labels=2, train_lora_a=True)


def _rates(model):
    return {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout) and "lora_dropout" not in n}


def _logits(model, seed):
    torch.manual_seed(seed)
    ids = torch.randint(1000, 2000, (4, 12), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_negative_keeps_the_checkpoints_rates_and_a_rate_reaches_every_dropout_layer(tiny_model_dir):
    kept = _rates(_model(tiny_model_dir))
    assert kept and set(kept.values()) == {0.0}  # the tiny checkpoint declares 0
    model = _model(tiny_model_dir, **{"model-dropout": 0.5})
    rates = _rates(model)
    assert rates.keys() == kept.keys() and set(rates.values()) == {0.5}
    model.train()
    assert not torch.equal(_logits(model, 1), _logits(model, 2))  # the rate acts in training
    model.eval()
    assert torch.equal(_logits(model, 1), _logits(model, 2))


def test_zero_makes_training_mode_deterministic(tiny_model_dir):
    model = _model(tiny_model_dir, **{"model-dropout": 0.0}).train()
    assert torch.equal(_logits(model, 1), _logits(model, 2))


def test_decoder_attention_dropout_is_set(tiny_llama_dir):
    model = _model(tiny_llama_dir, task="causal-lm", **{"model-dropout": 0.3})
    attention = [m for m in model.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    assert len(attention) == 2 and all(m.attention_dropout == 0.3 for m in attention)


@pytest.mark.parametrize("value", [1.0, -2.0])
def test_out_of_range_rates_are_refused(value):
    with pytest.raises(ConfigError, match="model-dropout"):
        parse_run_config({"model-dropout": value})


def test_a_node_process_builds_a_new_model_when_only_the_dropout_changes(tiny_model_dir, task_dir, tmp_path):
    # A process keeps one model per run settings; the dropout is one of them.
    def runtime(rate):
        run = parse_run_config({"model": tiny_model_dir, "dataset": task_dir, "cache-dir": str(tmp_path), "model-dropout": rate})
        return node.get_runtime(run, {"partition-id": 0, "num-partitions": 2}, ("0", "1"), train_lora_a=False)

    try:
        assert set(_rates(runtime(0.5).model).values()) == {0.5}
        assert set(_rates(runtime(0.0).model).values()) == {0.0}
    finally:
        node._MODELS.clear()
        node._NODE_DATA.clear()
