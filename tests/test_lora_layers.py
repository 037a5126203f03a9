"""`lora.layers`: LoRA in chosen transformer blocks only, and the backward pass
stopping at the lowest of them."""

import pytest
import torch

from fedlora.config import ConfigError, parse_run_config
from fedlora.model import build_model, is_lora_a, is_lora_b


def _adapted_blocks(model, marker):
    """The block indices whose modules carry LoRA factors (``.layer.N.`` or ``.layers.N.``)."""
    blocks = set()
    for name, _ in model.named_parameters():
        if is_lora_a(name) or is_lora_b(name):
            parts = name.split(".")
            blocks.add(int(parts[parts.index(marker) + 1]))
    return blocks


@pytest.mark.parametrize("layers,blocks", [("", {0, 1}), ("-1", {1}), ("0", {0}), ("1, -2", {0, 1})])
def test_layers_choose_the_adapted_blocks(tiny_model_dir, layers, blocks):
    model = build_model(parse_run_config({"model": tiny_model_dir, "lora.layers": layers}), num_labels=2, train_lora_a=True)
    assert _adapted_blocks(model, "layer") == blocks
    # Each adapted block keeps every target module: query and value, A and B.
    assert sum(is_lora_b(n) for n, _ in model.named_parameters()) == 2 * len(blocks)


def test_layers_apply_to_decoders(tiny_llama_dir):
    run = parse_run_config({"model": tiny_llama_dir, "task": "causal-lm", "lora.layers": "-1"})
    model = build_model(run, num_labels=2, train_lora_a=False)
    assert _adapted_blocks(model, "layers") == {1}


@pytest.mark.parametrize(
    "layers,fragment",
    [("2", "outside the model's 2 blocks"), ("-3", "outside the model's 2 blocks"), ("1,-1", "names a block twice")],
)
def test_layers_outside_the_model_are_refused(tiny_model_dir, layers, fragment):
    with pytest.raises(ConfigError) as e:
        build_model(parse_run_config({"model": tiny_model_dir, "lora.layers": layers}), num_labels=2, train_lora_a=True)
    assert e.value.key == "lora.layers" and fragment in str(e.value)


def test_layers_must_be_integers():
    with pytest.raises(ConfigError) as e:
        parse_run_config({"lora.layers": "top"})
    assert e.value.key == "lora.layers"


@pytest.mark.parametrize("layers,graph_below", [("", True), ("-1", False)])
def test_backward_stops_at_the_lowest_adapted_block(tiny_model_dir, layers, graph_below):
    """With the top block alone adapted, the lower block's output carries no autograd
    graph: the step computes no backward pass through it."""
    model = build_model(parse_run_config({"model": tiny_model_dir, "lora.layers": layers}), num_labels=2, train_lora_a=True).train()
    seen = {}
    blocks = model.base_model.model.bert.encoder.layer
    blocks[0].register_forward_hook(lambda _m, _args, out: seen.__setitem__("below", out[0].requires_grad))
    blocks[1].register_forward_hook(lambda _m, _args, out: seen.__setitem__("top", out[0].requires_grad))
    ids = torch.randint(1000, 2000, (3, 7))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0])).loss
    loss.backward()
    assert seen == {"below": graph_below, "top": True}
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
