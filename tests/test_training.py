"""The training loop: length-sorted micro-batches give the same step as one
pass (with and without DP-SGD), the optimizer (and the accountant) step once
per logical batch, and CPU training flushes denormal floats."""

import threading

import pytest
import torch

from fedlora import privacy, training
from fedlora.config import parse_run_config
from fedlora.data import Encoded
from fedlora.model import build_model, is_lora_b

LENGTHS = [12, 3, 9, 5, 12, 2, 7]  # varied, unsorted, with ties


def _model(tiny_model_dir):
    run = parse_run_config({"model": tiny_model_dir, "lora.dropout": 0.0})
    model = build_model(run, num_labels=2, train_lora_a=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B = 0 at init makes A's gradient 0: give B values so both are tested
        for n, p in model.named_parameters():
            if is_lora_b(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.train()
    return model


def _data(lengths=LENGTHS, width=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    ids = torch.randint(1000, 2000, (n, width), generator=g)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return Encoded({"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": torch.arange(n) % 2})


class RecordingData(Encoded):
    """Encoded that records the (examples, width) of every batch it hands out."""

    def __init__(self, enc: Encoded):
        super().__init__(enc.tensors)
        self.shapes = []

    def batch(self, idx):
        out = super().batch(idx)
        self.shapes.append(tuple(out["input_ids"].shape))
        return out


def _trainable(model):
    return {n.removeprefix("_module."): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _dp_setup(tiny_model_dir, noise, clip, expected=5):
    model = _model(tiny_model_dir)
    gsm = privacy.wrap_model(model)
    params = [p for p in gsm.parameters() if p.requires_grad]
    ledger = privacy.PrivacyLedger(1.0, 1e-5, noise_multiplier=noise, sample_rate=0.1, planned_steps=10)
    opt = privacy.dp_optimizer(torch.optim.SGD(params, lr=1.0), ledger, clip, expected_batch_size=expected, generator=torch.Generator().manual_seed(0))
    return model, gsm, opt


def _median_per_sample_norm(tiny_model_dir, enc):
    """A clipping bound that clips some samples and not others."""
    gsm = privacy.wrap_model(_model(tiny_model_dir))
    gsm(**enc.batch(list(range(len(enc))))).loss.backward()
    gs = [p.grad_sample for p in gsm.parameters() if p.requires_grad]
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in gs))
    gsm._close()
    return float(norms.median())


# -- (d) the micro-batch plan ----------------------------------------------------


def test_micro_batches_are_sorted_by_length_and_padded_to_their_own_longest():
    enc = _data()
    idx = [6, 0, 1, 2, 3, 4, 5]
    parts = training.micro_batches(enc, idx, 3)
    assert [len(p) for p in parts] == [3, 3, 1]
    assert sorted(sum(parts, [])) == sorted(idx)  # every example exactly once
    lengths = [[LENGTHS[i] for i in p] for p in parts]
    flat = sum(lengths, [])
    assert flat == sorted(flat, reverse=True)  # longest first, across micro-batches
    assert [enc.batch(p)["input_ids"].shape[1] for p in parts] == [max(x) for x in lengths] == [12, 7, 2]
    computed = sum(len(p) * max(x) for p, x in zip(parts, lengths))
    assert computed < len(idx) * max(LENGTHS)  # less padding than one pass
    # 0 (or a batch no larger than the size): one micro-batch, in the given order
    assert training.micro_batches(enc, idx, 0) == [idx]
    assert training.micro_batches(enc, idx, 7) == [idx]
    assert training.micro_batches(enc, torch.tensor(idx), 2)[0] == [0, 4]


def test_train_forwards_the_sorted_micro_batches(tiny_model_dir):
    model = _model(tiny_model_dir)
    data = RecordingData(_data())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    training.train(model, data, [list(range(7))], opt, 1, micro_batch_size=3)
    assert data.shapes == [(3, 12), (3, 7), (1, 2)]
    data.shapes.clear()
    training.train(model, data, [list(range(7))], opt, 1)  # default: the whole batch in one pass
    assert data.shapes == [(7, 12)]


# -- (a, b) micro-batches give the same step as one pass -----------------------------


@pytest.mark.parametrize("noise", [0.0, 1.0], ids=["no-noise", "seeded-noise"])
def test_dp_step_over_micro_batches_equals_one_pass(tiny_model_dir, noise):
    enc = _data()
    clip = _median_per_sample_norm(tiny_model_dir, enc)
    initial = _trainable(_model(tiny_model_dir))
    after, losses = {}, {}
    for size in (0, 2, 3):
        model, gsm, opt = _dp_setup(tiny_model_dir, noise, clip)
        r = training.train(gsm, enc, [list(range(len(enc)))], opt, 1, micro_batch_size=size)
        assert r.steps == 1 and r.examples == len(enc)
        after[size], losses[size] = _trainable(gsm), r.loss
        gsm._close()
    moved = max(float((after[0][n] - initial[n]).abs().max()) for n in initial)
    assert moved > 1e-3, "the step did not move the parameters: the test would be vacuous"
    for size in (2, 3):
        assert losses[size] == pytest.approx(losses[0], rel=1e-5)
        for n in initial:
            torch.testing.assert_close(after[size][n], after[0][n], rtol=1e-4, atol=1e-6, msg=f"micro-batch {size}: {n}")


def test_plain_step_over_micro_batches_equals_one_pass(tiny_model_dir):
    enc = _data()
    initial = _trainable(_model(tiny_model_dir))
    after, losses = {}, {}
    for size in (0, 2, 3):
        model = _model(tiny_model_dir)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        r = training.train(model, enc, [list(range(len(enc)))], opt, 1, micro_batch_size=size)
        after[size], losses[size] = _trainable(model), r.loss
    assert max(float((after[0][n] - initial[n]).abs().max()) for n in initial) > 1e-3
    for size in (2, 3):
        assert losses[size] == pytest.approx(losses[0], rel=1e-5)
        for n in initial:
            torch.testing.assert_close(after[size][n], after[0][n], rtol=1e-4, atol=1e-6, msg=f"micro-batch {size}: {n}")


# -- (c, e) one step per logical batch; empty batches still step -----------------------


def test_dp_optimizer_and_accountant_step_once_per_logical_batch(tiny_model_dir):
    from opacus.accountants import RDPAccountant

    model, gsm, opt = _dp_setup(tiny_model_dir, noise=1.0, clip=1.0)
    accountant = RDPAccountant()
    opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.1))
    inner_steps = []
    opt.original_optimizer.register_step_post_hook(lambda *_: inner_steps.append(1))
    batches = [list(range(7)), [], [1, 3, 5], [2]]
    r = training.train(gsm, _data(), batches, opt, len(batches), micro_batch_size=2)
    assert r.steps == len(inner_steps) == 4
    # One step per logical batch, at the logical batch's sampling rate (not
    # multiplied by the number of micro-batches).
    assert accountant.history == [(1.0, 0.1, 4)]
    gsm._close()


def test_plain_optimizer_steps_once_per_logical_batch(tiny_model_dir):
    model = _model(tiny_model_dir)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps = []
    opt.register_step_post_hook(lambda *_: steps.append(1))
    r = training.train(model, _data(), [list(range(7)), [], [0, 1, 2, 3, 4]], opt, 3, micro_batch_size=2)
    assert r.steps == len(steps) == 2  # without DP an empty batch is no step


def test_empty_batch_is_a_noise_only_dp_step_with_micro_batches(tiny_model_dir):
    from opacus.accountants import RDPAccountant

    model, gsm, opt = _dp_setup(tiny_model_dir, noise=1.0, clip=1.0)
    accountant = RDPAccountant()
    opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.1))
    before = _trainable(gsm)
    r = training.train(gsm, _data(), [[]], opt, 1, micro_batch_size=2)
    after = _trainable(gsm)
    assert r.steps == 1 and r.examples == 0
    assert accountant.history == [(1.0, 0.1, 1)]
    # noise only: std sigma * C / expected batch size = 0.2 per coordinate, lr 1
    delta = torch.cat([(after[n] - before[n]).flatten() for n in before])
    assert abs(float(delta.std()) - 0.2) < 0.02
    gsm._close()


# -- evaluation sorted by length ---------------------------------------------------------


def test_evaluate_sorted_by_length_equals_example_by_example(tiny_model_dir):
    model = _model(tiny_model_dir)
    enc = _data()
    model.eval()
    with torch.no_grad():
        outs = [model(**enc.batch([i])) for i in range(len(enc))]
    loss = sum(float(o.loss) for o in outs) / len(enc)
    acc = sum(int(o.logits.argmax(-1)[0] == enc.tensors["labels"][i]) for i, o in enumerate(outs)) / len(enc)
    model.train()
    data = RecordingData(enc)
    got = training.evaluate(model, data, 3)
    got_loss, got_acc = got["loss"], got["accuracy"]
    assert got_loss == pytest.approx(loss, rel=1e-5) and got_acc == acc
    assert [w for _, w in data.shapes] == [12, 7, 2]  # sorted: each batch padded to its own longest
    assert model.training


# -- (f) denormal floats are flushed on CPU ------------------------------------------------


def _denormals_survive() -> bool:
    """Whether arithmetic keeps denormals, on this thread and torch's intra-op
    threads (a tensor big enough to be split among them)."""
    x = torch.full((1 << 21,), 1e-40)
    return bool((x * 1.0 != 0).all())


def test_training_on_cpu_flushes_denormals_on_all_threads(tiny_model_dir):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    training.set_flush_denormal(False)
    try:
        # the intra-op threads exist (and keep denormals) before training starts
        assert _denormals_survive()
        model = _model(tiny_model_dir)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        training.train(model, _data(), [[0, 1, 2]], opt, 1)
        x = torch.full((1 << 21,), 1e-40)  # stored as 0 when flushing
        assert not bool((x * 1.0 != 0).any()), "denormals survive on some thread"
        # also from another thread, which evaluate sets for itself
        training.set_flush_denormal(False)
        seen = {}

        def other():
            training.set_flush_denormal(False)
            seen["before"] = _denormals_survive()
            training.evaluate(model, _data(), 4)
            seen["after"] = _denormals_survive()

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen == {"before": True, "after": False}
    finally:
        training.set_flush_denormal(False)


def test_clipped_sum_left_by_a_round_aborted_between_micro_batches_is_cleared(tiny_model_dir):
    # The model is shared by the nodes a process serves: a round that dies after some
    # micro-batches of a logical batch leaves their clipped sum on the parameters.
    enc = _data()
    model, gsm, opt = _dp_setup(tiny_model_dir, noise=0.0, clip=1.0)

    class Abort(Exception):
        pass

    class AbortingData(Encoded):
        calls = 0

        def batch(self, idx):
            AbortingData.calls += 1
            if AbortingData.calls == 3:
                raise Abort
            return super().batch(idx)

    with pytest.raises(Abort):
        training.train(gsm, AbortingData(enc.tensors), [list(range(7))], opt, 1, micro_batch_size=2)
    assert any(getattr(p, "summed_grad", None) is not None for p in gsm.parameters() if p.requires_grad)
    privacy.reset_per_sample_state(gsm)
    assert all(getattr(p, "summed_grad", None) is None for p in gsm.parameters())
    gsm._close()
