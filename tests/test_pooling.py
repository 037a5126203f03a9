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


# -- pooling = auto (the default): the pooling the checkpoint declares ------------------


def _declaring(src: str, dest, mode: str | None):
    """A copy of the model folder ``src`` that declares sentence-transformers pooling ``mode`` (None: none)."""
    import shutil

    shutil.copytree(src, dest)
    if mode:
        os.makedirs(dest / "1_Pooling")
        flags = {f"pooling_mode_{m}": m == mode for m in ("cls_token", "mean_tokens", "max_tokens")}
        (dest / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    return str(dest)


def test_declared_pooling_reads_the_sentence_transformers_file(tiny_model_dir, tmp_path):
    from fedlora.model import declared_pooling, packaged_model_path

    assert declared_pooling(_declaring(tiny_model_dir, tmp_path / "mean", "mean_tokens")) == "mean"
    assert declared_pooling(_declaring(tiny_model_dir, tmp_path / "cls", "cls_token")) == "cls"
    assert declared_pooling(tiny_model_dir) is None
    assert declared_pooling(packaged_model_path()) == "mean"  # all-MiniLM-L6-v2, the default model


def test_auto_pooling_follows_the_checkpoint(tiny_model_dir, tiny_gpt2_dir, tmp_path):
    def pooler(model_dir, **extra):
        run = parse_run_config({"model": model_dir, **extra})
        assert run.pooling == "auto"  # the default
        return build_model(run, num_labels=2, train_lora_a=False).base_model.model.bert.pooler

    assert isinstance(pooler(_declaring(tiny_model_dir, tmp_path / "mean", "mean_tokens")), MeanPooler)
    assert not isinstance(pooler(_declaring(tiny_model_dir, tmp_path / "cls", "cls_token")), MeanPooler)
    assert not isinstance(pooler(tiny_model_dir), MeanPooler)
    # Where mean pooling cannot apply, auto reads the architecture's own pooling instead of refusing.
    build_model(parse_run_config({"model": tiny_gpt2_dir, "task": "causal-lm"}), num_labels=2, train_lora_a=False)


def test_merge_refuses_an_auto_run_whose_checkpoint_pools_by_mean(tiny_model_dir, tmp_path):
    from fedlora.tools.merge import ADAPTER, MergeError, merge

    model_dir = _declaring(tiny_model_dir, tmp_path / "mean", "mean_tokens")
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / ADAPTER)
    (run_dir / ADAPTER / "adapter_config.json").write_text("{}")
    config = {"resolved": {"task": "classification", "model": model_dir, "pooling": "auto"}, "data": {"label-names": ["a", "b"]}}
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="declares mean pooling"):
        merge(str(run_dir), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written
