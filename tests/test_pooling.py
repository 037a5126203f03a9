"""pooling = mean: the classifier reads the mean of the last hidden states over the
real tokens (sentence-transformers' pooling) instead of BERT's [CLS] pooler."""

import json
import os

import pytest
import torch

from fedlora import privacy
from fedlora.config import ConfigError, parse_run_config
from fedlora.data import Encoded
from fedlora.model import MeanPooler, build_model, is_lora_b


def _model(tiny_model_dir, pooling="mean", train_lora_a=True):
    run = parse_run_config({"model": tiny_model_dir, "pooling": pooling, "lora.dropout": 0.0})
    model = build_model(run, num_labels=2, train_lora_a=train_lora_a)
    with torch.no_grad():  # B = 0 at init would make A's gradient zero: give B values
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if is_lora_b(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _batch(lengths, width=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return Encoded(
        {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": torch.tensor([i % 2 for i in range(len(lengths))])}
    )


def test_the_pooled_vector_is_the_masked_mean_and_padding_changes_nothing(tiny_model_dir):
    model = _model(tiny_model_dir)
    encoder = model.base_model.model.bert
    assert isinstance(encoder.pooler, MeanPooler)
    batch = _batch([3, 10, 6])
    with torch.no_grad():
        out = encoder(input_ids=batch.tensors["input_ids"], attention_mask=batch.tensors["attention_mask"])
        mask = batch.tensors["attention_mask"].unsqueeze(-1).float()
        manual = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(out.pooler_output, manual)
        # The same example alone, unpadded, gets the same logits as inside a padded batch.
        together = model(**{k: v for k, v in batch.batch([0, 1, 2]).items() if k != "labels"}).logits
        alone = model(**{k: v[:, :3] for k, v in batch.batch([0]).items() if k != "labels"}).logits
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and it differs from what the [CLS] pooler gives: the option does something
        cls = _model(tiny_model_dir, pooling="model")(**{k: v for k, v in batch.batch([0, 1, 2]).items() if k != "labels"}).logits
    assert not torch.allclose(cls, together)


@pytest.mark.parametrize("train_lora_a", [True, False], ids=["lora", "ffa-lora"])
def test_per_sample_gradients_with_mean_pooling_equal_autograd(tiny_model_dir, train_lora_a):
    model = _model(tiny_model_dir, train_lora_a=train_lora_a).train()
    enc = _batch([10, 4, 7, 2, 9])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = {n: [] for n in params}
    for i in range(len(enc)):
        model.zero_grad(set_to_none=True)
        n_tokens = int(enc.tensors["attention_mask"][i].sum())
        model(**{k: v[:, :n_tokens] if v.dim() == 2 else v for k, v in enc.batch([i]).items()}).loss.backward()  # alone, unpadded
        for n, p in params.items():
            reference[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    gsm = privacy.wrap_model(model)
    gsm(**enc.batch(list(range(len(enc))))).loss.backward()
    for n, p in gsm.named_parameters():
        if p.requires_grad:
            ref = torch.stack(reference[n.removeprefix("_module.")])
            assert ref.abs().max() > 0, n
            torch.testing.assert_close(p.grad_sample, ref, rtol=1e-4, atol=1e-6, msg=n)
    gsm._close()


def test_mean_pooling_is_refused_where_it_cannot_apply(tiny_model_dir, tiny_gpt2_dir, tmp_path):
    with pytest.raises(ConfigError, match="pooling"):
        parse_run_config({"task": "causal-lm", "pooling": "mean"})
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    no_pooler = tmp_path / "distilbert"
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=3000, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(no_pooler)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(no_pooler)
    with pytest.raises(ConfigError, match="no BERT-style pooler") as e:
        build_model(parse_run_config({"model": str(no_pooler), "pooling": "mean", "lora.target-modules": "q_lin,v_lin"}), num_labels=2, train_lora_a=False)
    assert e.value.key == "pooling"


def test_merge_refuses_a_mean_pooled_run(tmp_path):
    from fedlora.tools.merge import MergeError, run_settings

    config = {"resolved": {"task": "classification", "model": "m", "pooling": "mean"}, "data": {"label-names": ["a", "b"]}}
    with pytest.raises(MergeError, match="pooling"):
        run_settings(config, os.path.join(tmp_path, "config.json"), None, "")
    config["resolved"]["pooling"] = "model"
    assert run_settings(json.loads(json.dumps(config)), "config.json", None, "")["model"] == "m"
