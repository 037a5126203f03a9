"""Training steps per second and peak memory, fp32 vs bf16 and DP vs non-DP,
measured side by side in one run, on the device given (a GPU where there is one).

    python benchmarks/gpu.py [--device auto|cpu|cuda|cuda:N|mps] [--steps N] [--warmup N]
                             [--batch-size N] [--seq-len N] [--models minilm,roberta-large,smollm2]
                             [--quick]

Models (each through fedlora's own path: build_model, keep_trainable_fp32,
Opacus' wrapper, training.train):

- ``minilm``: all-MiniLM-L6-v2 classifier (the packaged weights), LoRA r=8 on query,value;
- ``roberta-large``: a RoBERTa-large-sized classifier (24 layers, hidden 1024; random weights,
  built here), LoRA r=8 on query,value;
- ``smollm2``: SmolLM2-135M-Instruct causal LM (the packaged GGUF), LoRA r=8 on q_proj,v_proj,
  loss on the last half of each sequence.

For each model, four settings: {fp32, bf16} x {non-DP, DP-SGD (Opacus, clipping and
noise)}, FFA-LoRA's trainable set (B only), the same random batch every step. It
prints steps/s, peak memory (CUDA: torch.cuda.max_memory_allocated; elsewhere the
process's peak RSS, which only grows, so read it with care) and the ratios bf16/fp32
and DP/non-DP. ``--quick``: tiny stand-ins for every model, to check the script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fedlora import devices, privacy, training  # noqa: E402
from fedlora.config import DEFAULT_LM, parse_run_config  # noqa: E402
from fedlora.data import Encoded  # noqa: E402
from fedlora.model import build_model, packaged_model_path  # noqa: E402


def _random_classifier(directory: str, quick: bool) -> str:
    """A RoBERTa-large-sized classifier with random weights (MiniLM's tokenizer is only for the vocabulary size)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if quick else {}
    cfg = RobertaConfig(
        vocab_size=50265,
        max_position_embeddings=514,
        **(sizes or dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)),
    )
    torch.manual_seed(0)
    RobertaForSequenceClassification(cfg).save_pretrained(directory)
    return directory


def _tiny_decoder(directory: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def _models(names: list[str], tmp: str, quick: bool) -> dict[str, dict]:
    out = {}
    for name in names:
        if name == "minilm":
            path = packaged_model_path() if not quick else _random_classifier(os.path.join(tmp, "minilm"), True)
            out[name] = {"model": path, "task": "classification", "lora.target-modules": "query,value"}
        elif name == "roberta-large":
            out[name] = {"model": _random_classifier(os.path.join(tmp, "roberta-large"), quick), "task": "classification", "lora.target-modules": "query,value"}
        elif name == "smollm2":
            path = DEFAULT_LM if not quick else _tiny_decoder(os.path.join(tmp, "smollm2"))
            out[name] = {"model": path, "task": "causal-lm", "lora.target-modules": "q_proj,v_proj"}
        else:
            raise SystemExit(f"unknown model {name!r}: choose from minilm, roberta-large, smollm2")
    return out


def _batch(task: str, batch_size: int, seq_len: int, vocab: int) -> Encoded:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 1, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if task == "causal-lm":
        labels = ids.clone()
        labels[:, : seq_len // 2] = -100  # the "prompt": no loss
        return Encoded({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return Encoded({"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch_size) % 2})


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(settings: dict, device: torch.device, precision: str, dp: bool, args) -> tuple[float, float]:
    """(steps per second, peak MiB) of ``args.steps`` training steps after ``args.warmup``."""
    run = parse_run_config({**settings, "precision": precision, "dp.epsilon": 3.0 if dp else 0.0, "device": str(device)})
    model = build_model(run, num_labels=2, train_lora_a=False, device=device)
    if precision == "bf16":
        devices.keep_trainable_fp32(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    data = _batch(run.task, args.batch_size, args.seq_len, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    target = model
    if dp:
        ledger = privacy.PrivacyLedger(3.0, 1e-5, noise_multiplier=1.0, sample_rate=0.01, planned_steps=10**6)
        target = privacy.wrap_model(model)
        opt = privacy.dp_optimizer(opt, ledger, 1.0, args.batch_size, torch.Generator().manual_seed(0))
    amp = (lambda: devices.autocast(run.compute, device)) if precision == "bf16" else None
    batch = [list(range(args.batch_size))]
    training.train(target, data, batch * args.warmup, opt, args.warmup, precision=amp)
    _peak_reset(device)
    _sync(device)
    start = time.perf_counter()
    training.train(target, data, batch * args.steps, opt, args.steps, precision=amp)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = _peak_mib(device)
    if dp:
        target._close()
    del model, target, opt
    devices.release()
    return args.steps / seconds, peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--models", default="minilm,roberta-large,smollm2")
    p.add_argument("--quick", action="store_true", help="tiny stand-in models: checks that the script runs")
    args = p.parse_args(argv)
    device = devices.resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device: {device} ({name}); batch {args.batch_size} x {args.seq_len} tokens; {args.steps} timed steps after {args.warmup}")
    if device.type != "cuda":
        print("NOTE: not a GPU: these figures are not GPU figures; peak memory is the process's peak RSS")
    precisions = ["fp32", "bf16"] if devices.supports_bf16(device) else ["fp32"]
    print(f"{'model':<14} {'precision':<9} {'DP':<4} {'steps/s':>9} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        models = _models([m.strip() for m in args.models.split(",") if m.strip()], tmp, args.quick)
        for model_name, settings in models.items():
            results = {}
            for precision in precisions:
                for dp in (False, True):
                    with contextlib.suppress(torch.OutOfMemoryError) if device.type == "cuda" else contextlib.nullcontext():
                        results[precision, dp] = measure(settings, device, precision, dp, args)
                        print(f"{model_name:<14} {precision:<9} {'yes' if dp else 'no':<4} {results[precision, dp][0]:>9.2f} {results[precision, dp][1]:>9.0f}")
            for precision in precisions:
                if (precision, True) in results and (precision, False) in results:
                    ratio = results[precision, True][0] / results[precision, False][0]
                    print(f"{model_name:<14} {precision}: DP / non-DP steps/s = {ratio:.3f}")
            for dp in (False, True):
                if ("bf16", dp) in results and ("fp32", dp) in results:
                    speed = results["bf16", dp][0] / results["fp32", dp][0]
                    memory = results["bf16", dp][1] / results["fp32", dp][1]
                    print(f"{model_name:<14} {'DP' if dp else 'non-DP'}: bf16 / fp32 steps/s = {speed:.3f}, peak memory = {memory:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
