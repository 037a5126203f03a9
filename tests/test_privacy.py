"""DP-SGD checks: Opacus' per-sample gradients through PEFT LoRA layers equal
plain autograd, clipping bounds each sample, and the ledger's epsilon equals an
independent accountant computation (never trust the wrapper blindly: opacus
issue 820 reported silently corrupted LoRA gradients with PEFT)."""

import math

import numpy as np
import pytest
import torch

from fedlora import privacy
from fedlora.config import DPConfig, parse_run_config
from fedlora.data import Encoded
from fedlora.model import build_model, is_lora_b


@pytest.fixture(autouse=True)
def _ieee_floats():
    # Training tests flush denormals for the rest of the process, and Opacus' reference
    # figures below would then lose their largest orders (privacy._ieee_floats): compute
    # every test's figures, ours and Opacus', in IEEE floats.
    with privacy._ieee_floats():
        yield


def _model(tiny_model_dir, train_lora_a, train_head=True, lora_dropout=0.0, layers=""):
    run = parse_run_config({"model": tiny_model_dir, "train-head": train_head, "lora.dropout": lora_dropout, "lora.layers": layers})
    model = build_model(run, num_labels=3, train_lora_a=train_lora_a)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B = 0 at init makes A's gradient 0: give B values so both are tested
        for n, p in model.named_parameters():
            if is_lora_b(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _batch(n=6, width=12, vocab=1000, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1000 + vocab, (n, width), generator=g)
    mask = torch.ones(n, width, dtype=torch.long)
    for i in range(n):  # ragged lengths: padding must not leak into gradients
        mask[i, width - i :] = 0
    ids = ids * mask
    return Encoded({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": torch.arange(n) % 3})


def _autograd_per_sample(model, enc):
    """Reference: each example alone, plain autograd."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(len(enc)):
        model.zero_grad(set_to_none=True)
        model(**enc.batch([i])).loss.backward()
        for n, p in params.items():
            out[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("layers", ["", "-1"], ids=["every-block", "top-block"])
@pytest.mark.parametrize("train_lora_a", [True, False], ids=["lora", "ffa-lora"])
def test_per_sample_gradients_equal_autograd(tiny_model_dir, train_lora_a, layers):
    # The top block alone: the frozen block below it leaves the autograd graph, and Opacus'
    # hooks must still see every adapted layer.
    model = _model(tiny_model_dir, train_lora_a, layers=layers)
    model.train()
    enc = _batch()
    reference = _autograd_per_sample(model, enc)
    gsm = privacy.wrap_model(model)
    gsm(**enc.batch(list(range(len(enc))))).loss.backward()
    names = {n.removeprefix("_module."): p for n, p in gsm.named_parameters() if p.requires_grad}
    assert set(names) == set(reference)
    assert any(".lora_A." in n for n in names) == train_lora_a
    for n, p in names.items():
        assert p.grad_sample is not None, n
        assert p.grad_sample.shape == reference[n].shape, n
        assert reference[n].abs().max() > 0, f"{n}: reference gradient is zero, test would be vacuous"
        torch.testing.assert_close(p.grad_sample, reference[n], rtol=1e-4, atol=1e-6, msg=n)
    gsm._close()


@pytest.mark.parametrize("d_in,d_out", [(8, 48), (48, 8), (16, 16)], ids=["wide-out", "wide-in", "square"])
@pytest.mark.parametrize("shape", [(5,), (5, 7), (5, 3, 4)], ids=["2d", "3d", "4d"])
def test_linear_grad_sample_equals_opacus_einsum(d_in, d_out, shape):
    """fedlora's Linear sampler picks the faster matmul orientation; the per-sample
    gradients (weight and bias, any number of token dimensions, activations cast to
    the backprops' dtype) must be exactly what Opacus' einsum gives."""
    from opacus import GradSampleModule
    from opacus.grad_sample.linear import compute_linear_grad_sample

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(*shape, d_in, generator=g).to(torch.bfloat16)
    backprops = torch.randn(*shape, d_out, generator=g)
    ours, theirs = privacy.linear_grad_sample(layer, [x], backprops), compute_linear_grad_sample(layer, [x], backprops)
    assert set(ours) == set(theirs) == {layer.weight, layer.bias}
    for p in theirs:
        assert ours[p].shape == (shape[0], *p.shape)
        torch.testing.assert_close(ours[p], theirs[p], rtol=1e-5, atol=1e-5)
    layer.bias.requires_grad_(False)
    assert set(privacy.linear_grad_sample(layer, [x], backprops)) == {layer.weight}
    # Only fedlora's hooks class uses it: Opacus' own registry is unchanged.
    assert GradSampleModule.GRAD_SAMPLERS[torch.nn.Linear] is compute_linear_grad_sample
    assert privacy._output_hooks_class().GRAD_SAMPLERS[torch.nn.Linear] is privacy.linear_grad_sample


@pytest.mark.parametrize("d_in,d_out", [(8, 48), (48, 8)], ids=["wide-out", "wide-in"])
def test_linear_grad_sample_scale_multiplies_every_gradient(d_in, d_out):
    """The loss reduction's factor, applied to whichever operand is smaller, must give
    the scaled gradients of weight and bias."""
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(d_in, d_out)
    x, backprops = torch.randn(4, 6, d_in, generator=g), torch.randn(4, 6, d_out, generator=g)
    plain, scaled = privacy.linear_grad_sample(layer, [x], backprops), privacy.linear_grad_sample(layer, [x], backprops, 3.0)
    assert set(scaled) == {layer.weight, layer.bias}
    for p in plain:
        torch.testing.assert_close(scaled[p], 3.0 * plain[p], rtol=1e-5, atol=1e-6)


class _TwiceApplied(torch.nn.Module):
    """One Linear layer applied twice per forward (as a tied or reused layer is), then a
    bias-free one: the hooks' accumulation path for a layer called more than once."""

    def __init__(self):
        super().__init__()
        self.shared, self.out = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(5, 6), (5, 4, 6)], ids=["2d", "tokens"])
def test_output_hooks_per_sample_gradients_of_a_reused_layer_equal_autograd(reduction, shape):
    """``_OutputHooks``' short path for Linear layers (the reduction's factor inside the
    sampler, the full-batch gradient adopted as the buffer) and Opacus' accumulation when
    a layer runs twice per batch, against per-sample autograd, for both loss reductions."""
    torch.manual_seed(0)
    model, x = _TwiceApplied(), torch.randn(*shape)
    target = torch.randint(0, 3, (shape[0],))

    def loss_of(out, y, red):
        return torch.nn.functional.cross_entropy(out.reshape(len(y), -1, 3).mean(1), y, reduction=red)

    reference = {}
    for i in range(shape[0]):
        model.zero_grad()
        loss_of(model(x[i : i + 1]), target[i : i + 1], "sum").backward()
        for n, p in model.named_parameters():
            reference.setdefault(n, []).append(p.grad.clone())
    model.zero_grad()
    gsm = privacy._output_hooks_class()(model, batch_first=True, loss_reduction=reduction)
    loss_of(gsm(x), target, reduction).backward()
    for n, p in model.named_parameters():
        assert p.grad_sample is not None and not hasattr(p, "_current_grad_sample"), n
        torch.testing.assert_close(p.grad_sample, torch.stack(reference[n]), rtol=1e-4, atol=1e-6, msg=n)
    gsm._close()


@pytest.mark.parametrize("zero_noise", ["ledger", "none"], ids=["ledger-with-noise-0", "no-ledger"])
def test_clipping_bounds_each_sample_and_matches_manual_dp_sgd(tiny_model_dir, zero_noise):
    model = _model(tiny_model_dir, train_lora_a=True)
    model.train()
    enc = _batch(n=5)
    reference = _autograd_per_sample(model, enc)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in reference.values()))
    clip = float(norms.median())  # some samples clipped, some not
    assert (norms > clip).any() and (norms < clip).any()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert torch.all(norms * factors <= clip * (1 + 1e-5))

    gsm = privacy.wrap_model(model)
    params = [p for p in gsm.parameters() if p.requires_grad]
    # No ledger: clipping only, as training without DP does (node.train_round).
    ledger = privacy.PrivacyLedger(1.0, 1e-5, noise_multiplier=0.0, sample_rate=0.1, planned_steps=1) if zero_noise == "ledger" else None
    opt = privacy.dp_optimizer(torch.optim.SGD(params, lr=1.0), ledger, clip, expected_batch_size=len(enc), generator=None)
    gsm(**enc.batch(list(range(len(enc))))).loss.backward()
    opt.pre_step()  # clip, accumulate, (zero) noise, scale
    named = {n.removeprefix("_module."): p for n, p in gsm.named_parameters() if p.requires_grad}
    for n, p in named.items():
        expected = (reference[n] * factors.view(-1, *[1] * (reference[n].dim() - 1))).sum(0) / len(enc)
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7, msg=n)
    gsm._close()


def test_per_group_clipping_bounds_the_head_and_the_adapter_separately(tiny_model_dir):
    """dp.clipping = per-group: each sample's head gradient is clipped to C·√s and its
    adapter gradient to C·√(1-s), each by its own factor; the noise is σ·C as with flat
    clipping (the sensitivity is the same C)."""
    from fedlora.model import is_head

    model = _model(tiny_model_dir, train_lora_a=False)
    model.train()
    enc = _batch(n=6)
    reference = _autograd_per_sample(model, enc)
    group = {n: 0 if is_head(n) else 1 for n in reference}
    assert set(group.values()) == {0, 1}

    def group_norms(g):
        return torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for n, v in reference.items() if group[n] == g))

    head, adapter = group_norms(0), group_norms(1)
    # Bounds chosen so that each group has clipped and unclipped samples: the factors differ per group.
    bounds = (float(head.median()), float(adapter.median()))
    assert (head > bounds[0]).any() and (head < bounds[0]).any() and (adapter > bounds[1]).any() and (adapter < bounds[1]).any()
    total = math.hypot(*bounds)
    factors = [(b / (n + 1e-6)).clamp(max=1.0) for b, n in zip(bounds, (head, adapter))]
    assert not torch.allclose(factors[0], factors[1])

    gsm = privacy.wrap_model(model)
    named = {n.removeprefix("_module."): p for n, p in gsm.named_parameters() if p.requires_grad}
    ledger = privacy.PrivacyLedger(1.0, 1e-5, noise_multiplier=0.0, sample_rate=0.1, planned_steps=1)
    opt = privacy.dp_optimizer(
        torch.optim.SGD(list(named.values()), lr=1.0), ledger, total, len(enc), None, groups=[group[n] for n in named], group_norms=bounds
    )
    gsm(**enc.batch(list(range(len(enc))))).loss.backward()
    opt.pre_step()
    for n, p in named.items():
        f = factors[group[n]]
        expected = (reference[n] * f.view(-1, *[1] * (reference[n].dim() - 1))).sum(0) / len(enc)
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7, msg=n)
    assert opt.max_grad_norm == pytest.approx(total)  # the noise's scale: sigma * C, C the total bound
    with pytest.raises(ValueError, match="add up"):
        privacy.dp_optimizer(torch.optim.SGD(list(named.values()), lr=1.0), ledger, 2 * total, 1, None, groups=[group[n] for n in named], group_norms=bounds)
    gsm._close()


def test_per_group_norms_split_max_grad_norm_and_need_a_trained_head():
    """dp.group_norms(): the squares add up to max-grad-norm², the head gets its share; no head, no per-group."""
    from fedlora.config import parse_run_config as parse

    run = parse({"dp.clipping": "per-group", "dp.head-share": 0.2, "dp.max-grad-norm": 0.5})
    head, adapter = run.dp.group_norms()
    assert head**2 + adapter**2 == pytest.approx(0.25) and head**2 == pytest.approx(0.2 * 0.25)
    with pytest.raises(Exception, match="dp.clipping"):
        parse({"dp.clipping": "per-group", "train-head": False})


def test_noise_is_added_with_the_calibrated_scale(tiny_model_dir):
    model = _model(tiny_model_dir, train_lora_a=False)
    model.train()
    gsm = privacy.wrap_model(model)
    params = [p for p in gsm.parameters() if p.requires_grad]
    ledger = privacy.PrivacyLedger(1.0, 1e-5, noise_multiplier=2.0, sample_rate=0.1, planned_steps=1)
    opt = privacy.dp_optimizer(torch.optim.SGD(params, lr=1.0), ledger, 0.5, expected_batch_size=1, generator=torch.Generator().manual_seed(0))
    for p in params:  # an empty batch: the step is noise only, std = sigma * C / batch
        p.grad_sample = torch.zeros((0, *p.shape))
    opt.pre_step()
    noise = torch.cat([p.grad.flatten() for p in params])
    assert noise.numel() > 1000
    assert abs(float(noise.std()) - 2.0 * 0.5) < 0.05
    gsm._close()


def _independent_epsilon(history, delta):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 384, 512, 768, 1024]
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=t, orders=orders) for s, q, t in history)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def test_ledger_epsilon_matches_independent_accounting_and_budget_holds():
    dp = DPConfig(epsilon=2.0, delta=1e-5, max_grad_norm=1.0)
    ledger = privacy.PrivacyLedger.plan(dp, num_examples=800, batch_size=16, planned_steps=60)
    assert ledger.sample_rate == 16 / 800
    for _ in range(3):
        ledger.check(20)
        ledger.record(20)
    eps = ledger.epsilon()
    assert eps == pytest.approx(_independent_epsilon([(ledger.noise_multiplier, 16 / 800, 60)], 1e-5), rel=1e-9)
    # Calibrated to the budget: at most the target, within the search tolerance of it.
    assert dp.epsilon - privacy.EPSILON_TOLERANCE - 1e-9 <= eps <= dp.epsilon
    # A node never trains past its budget.
    with pytest.raises(privacy.BudgetExhausted, match="budget exhausted"):
        ledger.check(5)
    restored = privacy.PrivacyLedger.from_json(ledger.to_json())
    assert restored.epsilon() == eps and restored.steps_spent == 60


def test_prv_accountant_calibrates_less_noise_for_the_same_budget():
    from opacus.accountants import PRVAccountant
    from opacus.accountants.utils import get_noise_multiplier

    rdp = privacy.PrivacyLedger.plan(DPConfig(epsilon=2.0, delta=1e-5), num_examples=800, batch_size=16, planned_steps=60)
    prv = privacy.PrivacyLedger.plan(DPConfig(epsilon=2.0, delta=1e-5, accountant="prv"), num_examples=800, batch_size=16, planned_steps=60)
    assert (rdp.accountant, prv.accountant) == ("rdp", "prv")
    # Opacus' own search over its PRV epsilon, to the bit, and less noise than RDP's bound allows.
    kwargs = dict(target_epsilon=2.0, target_delta=1e-5, sample_rate=16 / 800, steps=60, epsilon_tolerance=privacy.EPSILON_TOLERANCE)
    assert prv.noise_multiplier == get_noise_multiplier(accountant="prv", eps_error=privacy.PRV_EPS_ERROR, **kwargs)
    assert prv.noise_multiplier < 0.97 * rdp.noise_multiplier
    for _ in range(3):
        prv.check(20)
        prv.record(20)
    acc = PRVAccountant()
    acc.history = [(prv.noise_multiplier, 16 / 800, 60)]
    assert prv.epsilon() == acc.get_epsilon(delta=1e-5, eps_error=privacy.PRV_EPS_ERROR)
    assert 2.0 - privacy.EPSILON_TOLERANCE - 1e-9 <= prv.epsilon() <= 2.0
    # The same history is worth more epsilon by RDP's looser bound: the accountant is part of the claim.
    assert privacy.epsilon_of(prv.history, 1e-5) > 2.0
    with pytest.raises(privacy.BudgetExhausted):
        prv.check(5)
    # Steps recorded in one entry or several are one composition: the epsilon a check allowed is
    # the one the ledger then reports.
    split = [(prv.noise_multiplier, 16 / 800, 20)] * 3
    assert privacy.epsilon_of(split, 1e-5, "prv") == prv.epsilon()
    restored = privacy.PrivacyLedger.from_json(prv.to_json())
    assert restored.accountant == "prv" and restored.epsilon() == prv.epsilon()


def test_a_ledger_stored_before_the_accountant_choice_reads_as_rdp():
    import json

    stored = {"target_epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 0.9, "sample_rate": 0.02, "planned_steps": 40, "history": [[0.9, 0.02, 8]]}
    ledger = privacy.PrivacyLedger.from_json(json.dumps(stored))
    assert ledger.accountant == "rdp" and ledger.epsilon() == privacy.epsilon_of([(0.9, 0.02, 8)], 1e-5, "rdp")


@pytest.mark.parametrize(
    "history",
    [
        [(1.09375, 512 / 6689, 24)],
        [(0.58, 64 / 22449, 40)],
        [(0.8, 16 / 67, 2), (0.8, 16 / 67, 4)],  # a small node: large sampling rate
        [(1.2, 0.01, 30), (2.5, 0.5, 3), (1.2, 0.01, 7)],  # mixed mechanisms
    ],
)
def test_epsilon_is_opacus_rdp_accountants_to_the_bit(history):
    # epsilon_of reuses each (noise, rate)'s per-step RDP; it must stay Opacus' figure exactly.
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    for _ in range(2):  # computed, then from the per-step cache
        assert privacy.epsilon_of(history, 1e-5) == acc.get_epsilon(delta=1e-5, alphas=privacy.ALPHAS)


@pytest.mark.parametrize("slack", ["default", "every-order"])
def test_epsilon_is_opacus_to_the_bit_for_random_histories(slack, monkeypatch):
    # epsilon_of computes only the orders that can hold the minimum; with a huge slack, all of them.
    from opacus.accountants import RDPAccountant

    if slack != "default":
        monkeypatch.setattr(privacy, "_SLACK", 1e6)
    rng = np.random.default_rng(13)
    for _ in range(25):
        history = [
            (
                float(rng.choice([0.3, 0.55, 0.9, 1.4, 3.0, 12.0, 60.0]) * rng.uniform(0.9, 1.1)),
                float(rng.choice([1e-3, 0.02, 0.24, 0.53, 0.9, 1.0])),
                int(rng.integers(1, 1000)),
            )
            for _ in range(int(rng.integers(1, 4)))
        ]
        privacy._PER_STEP.clear()
        acc = RDPAccountant()
        acc.history = list(history)
        expected = acc.get_epsilon(delta=1e-5, alphas=privacy.ALPHAS)
        assert privacy.epsilon_of(history, 1e-5) == expected, history
        assert privacy.epsilon_of(history, 1e-5) == expected, history  # again, from the per-step cache


def _opacus_noise(epsilon: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(
        target_epsilon=epsilon,
        target_delta=1e-5,
        sample_rate=sample_rate,
        steps=steps,
        accountant="rdp",
        epsilon_tolerance=privacy.EPSILON_TOLERANCE,
        alphas=privacy.ALPHAS,
    )


@pytest.mark.parametrize(("epsilon", "sample_rate", "steps"), [(3.0, 16 / 67, 6), (3.0, 512 / 22449, 24), (1.0, 64 / 800, 60), (0.5, 16 / 30, 6)])
def test_noise_calibration_is_opacus_get_noise_multiplier_to_the_bit(epsilon, sample_rate, steps):
    # The search decides most comparisons from bounds; its result must stay Opacus'.
    dp = DPConfig(epsilon=epsilon, delta=1e-5, max_grad_norm=1.0)
    ours = privacy.calibrate_noise(dp, sample_rate, steps)
    theirs = _opacus_noise(epsilon, sample_rate, steps)
    assert ours == theirs
    assert epsilon - privacy.EPSILON_TOLERANCE <= privacy.epsilon_of([(ours, sample_rate, steps)], 1e-5) <= epsilon


@pytest.mark.parametrize(("epsilon", "sample_rate", "steps"), [(3.0, 16 / 53, 6), (5.0, 0.64, 1), (0.3, 0.51, 400), (8.0, 0.23, 24), (2.0, 0.0024, 6)])
@pytest.mark.parametrize("slack", ["default", "every-comparison-exact"])
def test_noise_calibration_matches_opacus_whichever_way_a_comparison_is_decided(epsilon, sample_rate, steps, slack, monkeypatch):
    # With a huge slack no bound decides anything, so every comparison takes the exact path.
    if slack != "default":
        monkeypatch.setattr(privacy, "_SLACK", 1e6)
    ours = privacy.calibrate_noise(DPConfig(epsilon=epsilon, delta=1e-5, max_grad_norm=1.0), sample_rate, steps)
    theirs = _opacus_noise(epsilon, sample_rate, steps)
    assert ours == theirs


def test_the_bounds_edge_cases_behave_as_opacus():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    # The upper bound is a minimum over some of Opacus' own orders: the skeleton must be among them.
    assert set(privacy._SKELETON) <= set(privacy.ALPHAS)
    for delta in (0.0, -1.0):  # no epsilon can be formed: Opacus answers inf
        acc = RDPAccountant()
        acc.history = [(1.0, 0.1, 10)]
        assert privacy.epsilon_of([(1.0, 0.1, 10)], delta) == acc.get_epsilon(delta=delta, alphas=privacy.ALPHAS) == math.inf
    assert privacy.epsilon_of([(0.0, 0.1, 10)], 1e-5) == math.inf  # no noise
    for target in (math.inf, math.nan):  # Opacus never enters its loops
        theirs = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp", alphas=privacy.ALPHAS)
        assert privacy._noise_search(target, 1e-5, 0.1, 10) == theirs


@pytest.mark.parametrize(("sigma", "sample_rate"), [(0.6, 0.3), (1.1, 0.02), (3.0, 0.9), (0.9, 1.0), (25.0, 0.5)])
def test_the_order_lower_bounds_are_below_opacus_rdp_at_every_order(sigma, sample_rate):
    from opacus.accountants.analysis import rdp as analysis

    alphas = np.asarray(privacy.ALPHAS, dtype=float)
    exact = np.asarray(analysis.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=7, orders=privacy.ALPHAS))
    for known in (privacy._SKELETON, [2.0, 63.0], [4.5, 4.6, 4.7, 12.0, 13.0]):
        orders = np.asarray(known)
        rdp = np.asarray(analysis.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=7, orders=known))
        lower = privacy._order_lower_bounds(orders, rdp, alphas)
        assert not np.isnan(exact).any()
        assert np.all(lower <= exact * (1 + 1e-12))
        np.testing.assert_allclose(lower[np.isin(alphas, orders)], rdp, rtol=1e-12)  # exact where known


def test_the_accountant_gives_the_same_figures_after_training_flushed_denormals():
    # Under flush-to-zero Opacus' RDP at order 1024 is NaN; here 1024 is the optimal order.
    import sys

    from fedlora.config import DPConfig
    from fedlora.training import set_flush_denormal

    history = [(50.0, 0.01, 100)]
    dp = DPConfig(epsilon=0.006, delta=1e-5, max_grad_norm=1.0)
    privacy._PER_STEP.clear()
    eps, sigma = privacy.epsilon_of(history, 1e-5), privacy.calibrate_noise(dp, 0.01, 100)
    assert privacy._spent(history, 1e-5)[1] == 1024.0
    if not set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert sys.float_info.min * 0.5 == 0.0  # flushing
        privacy._PER_STEP.clear()
        assert privacy.epsilon_of(history, 1e-5) == eps
        assert privacy.calibrate_noise(dp, 0.01, 100) == sigma
        assert sys.float_info.min * 0.5 == 0.0  # and still flushing after the calls
    finally:
        set_flush_denormal(False)


def test_prv_accountant_agrees_epsilon_is_an_upper_bound():
    # A tighter accountant must never report more than what we claim.
    from opacus.accountants import PRVAccountant

    dp = DPConfig(epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    ledger = privacy.PrivacyLedger.plan(dp, num_examples=1000, batch_size=20, planned_steps=100)
    ledger.record(100)
    prv = PRVAccountant()
    prv.history = list(ledger.history)
    assert prv.get_epsilon(delta=1e-5) <= ledger.epsilon() + 1e-6
    assert math.isfinite(ledger.epsilon())


def test_unreachable_budget_is_a_config_error():
    from fedlora.config import ConfigError

    with pytest.raises(ConfigError) as e:
        privacy.PrivacyLedger.plan(DPConfig(epsilon=1e-6, delta=1e-9, max_grad_norm=1.0), num_examples=10, batch_size=10, planned_steps=10_000)
    assert e.value.key == "dp.epsilon"


def test_per_sample_state_left_by_an_aborted_round_is_cleared(tiny_model_dir):
    # The model is shared by the nodes a process serves: a round that dies between
    # backward and step must not leak its per-sample gradients into the next one.
    model = _model(tiny_model_dir, train_lora_a=False)
    gsm = privacy.wrap_model(model)
    enc = _batch()
    gsm(**enc.batch([0, 1, 2])).loss.backward()  # aborted: no step
    privacy.reset_per_sample_state(gsm)
    gsm(**enc.batch([3, 4])).loss.backward()
    for p in gsm.parameters():
        if p.requires_grad:
            assert isinstance(p.grad_sample, torch.Tensor) and p.grad_sample.shape[0] == 2
    gsm._close()


def test_secure_noise_for_deployments_has_the_calibrated_scale_and_is_not_reproducible(tiny_model_dir):
    model = _model(tiny_model_dir, train_lora_a=False)
    gsm = privacy.wrap_model(model)
    params = [p for p in gsm.parameters() if p.requires_grad]
    ledger = privacy.PrivacyLedger(1.0, 1e-5, noise_multiplier=2.0, sample_rate=0.1, planned_steps=1)
    draws = []
    for _ in range(2):
        opt = privacy.dp_optimizer(torch.optim.SGD(params, lr=1.0), ledger, 0.5, expected_batch_size=1, generator=None)
        assert opt.noise_source == "secure"
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape))
        opt.pre_step()
        draws.append(torch.cat([p.grad.flatten() for p in params]).clone())
    noise = draws[0]
    # ~1,100 values here: the standard error of the std is ~0.02, so 0.1 is ~5 of them.
    assert noise.numel() > 1000 and abs(float(noise.std()) - 1.0) < 0.1
    assert not torch.equal(draws[0], draws[1])
    gsm._close()


def test_secure_gaussians_split_one_draw_by_shape(monkeypatch):
    """A DP step draws the secure noise of all its tensors at once: the parts have the
    tensors' shapes, in order, and are consecutive slices of one secure_gaussian draw."""
    calls = []
    real = privacy.secure_gaussian

    def counted(shape, std):
        calls.append((shape, std))
        return real(shape, std)

    monkeypatch.setattr(privacy, "secure_gaussian", counted)
    shapes = [(3, 4), (), (5,), (2, 1, 3)]
    parts = privacy.secure_gaussians(shapes, 0.5)
    assert calls == [((12 + 1 + 5 + 6,), 0.5)]
    assert [tuple(p.shape) for p in parts] == shapes
    flat = torch.cat([p.flatten() for p in parts])
    assert flat.dtype == torch.float32 and flat.unique().numel() == flat.numel()


def test_secure_gaussian_is_gaussian_with_the_requested_scale():
    z = privacy.secure_gaussian((400_000,), 2.0).double()
    # Standard errors at n = 400k: mean 0.003, std 0.002, kurtosis 0.008; bounds are >= 8 of them.
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 2.0) < 0.02
    kurtosis = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    assert 2.93 < kurtosis < 3.07  # Gaussian: 3 (uniform would be 1.8)
    assert float((z.abs() > 2 * 2.0).double().mean()) == pytest.approx(0.0455, abs=0.003)  # 2-sigma tail


def test_secure_bytes_are_chacha20_under_a_fresh_key_from_the_os(monkeypatch):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    a, b = privacy.secure_bytes(1000), privacy.secure_bytes(1000)
    assert len(a) == 1000 and a != b  # a new key each call
    keys = iter([bytes(range(32)), bytes(range(32)), bytes(range(1, 33))])
    monkeypatch.setattr(privacy.os, "urandom", lambda k: next(keys))
    first, again, other = privacy.secure_bytes(64), privacy.secure_bytes(64), privacy.secure_bytes(64)
    # Nothing but the key decides the bytes: the same key, the same keystream.
    assert first == again != other
    # RFC 8439 section 2.4.2's key, block counter 1 and nonce 00:00:00:00:00:00:00:4a:00:00:00:00
    # (cryptography's 16-byte nonce: 4 counter bytes, then the 12-byte nonce): its keystream
    # starts with these bytes (the RFC's ciphertext XOR its plaintext); checks the cipher itself.
    stream = (
        Cipher(algorithms.ChaCha20(bytes(range(32)), (1).to_bytes(4, "little") + bytes.fromhex("000000000000004a00000000")), mode=None)
        .encryptor()
        .update(bytes(16))
    )
    assert stream == bytes(x ^ y for x, y in zip(bytes.fromhex("6e2e359a2568f98041ba0728dd0d6981"), b"Ladies and Gentl"))


def _pairs_of_draws(n: int) -> np.ndarray:
    """The layout ``secure_gaussian`` documents, for n >= 2 values: the Box-Muller pair of each
    of the 4 summed draws (4, n); rows 0-1 take cosine outputs, rows 2-3 sine outputs."""
    p = np.arange(2 * n)
    return np.concatenate([p, np.roll(p, 1)]).reshape(4, n)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_secure_gaussian_never_sums_both_outputs_of_one_box_muller_pair(n, monkeypatch):
    if n >= 2:
        pairs = _pairs_of_draws(n)
        assert all(len(set(pairs[:, i])) == 4 for i in range(n))  # 4 different pairs per value
        assert sorted(pairs[:2].ravel()) == sorted(pairs[2:].ravel()) == list(range(2 * n))  # each output once
    # The values follow that layout: rebuild them from the same uniforms.
    draws = iter([np.linspace(0.1, 0.9, k) for k in (4 * n, 4 * n)] if n < 2 else [np.linspace(0.1, 0.9, 2 * n), np.linspace(0.05, 0.95, 2 * n)])
    monkeypatch.setattr(privacy, "secure_uniform", lambda k: next(draws))
    got = privacy.secure_gaussian((n,), 2.0).double().numpy()
    if n >= 2:
        u1, u2 = np.linspace(0.1, 0.9, 2 * n), np.linspace(0.05, 0.95, 2 * n)
        r, t = np.sqrt(-2 * np.log(u1)), 2 * np.pi * u2
        p = _pairs_of_draws(n)
        want = (r[p[:2]] * np.cos(t[p[:2]])).sum(0) + (r[p[2:]] * np.sin(t[p[2:]])).sum(0)
    else:
        u = np.linspace(0.1, 0.9, 4)
        want = (np.sqrt(-2 * np.log(u)) * np.cos(2 * np.pi * u)).sum(0, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_secure_poisson_sampling_has_the_sampling_rate():
    sizes = [len(b) for b in privacy.poisson_batches(10_000, 0.05, 20, generator=None)]
    assert len(sizes) == 20 and abs(sum(sizes) / 20 - 500) < 30
