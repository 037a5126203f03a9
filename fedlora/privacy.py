"""Sample-level differential privacy for a node: DP-SGD with Opacus.

``PrivacyLedger`` is the node's budget: the target (epsilon, delta), the noise
multiplier calibrated once for the whole run, the accountant (Opacus' RDP, or its
PRV for a tighter bound), and the history of (noise multiplier, sample rate,
steps) — the exact state Opacus' accountants keep, so it can be stored in the
node's persistent state and the epsilon recomputed by anyone. ``dp_components``
wraps a model and optimizer for DP-SGD with Poisson sampling.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ConfigError, DPConfig

# Opacus' default RDP orders stop at 63; with the small sampling rates of
# federated clients and few steps the optimum sits at that edge, so the bound
# is looser than it need be. Higher orders keep it valid and tighter.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 384, 512, 768, 1024]
# get_noise_multiplier searches sigma until epsilon is within this of the target, from below.
EPSILON_TOLERANCE = 0.01
# The PRV accountant's epsilon is an upper bound at most this far above the true one
# (Opacus' default); calibration and every later epsilon use the same value.
PRV_EPS_ERROR = 0.01


# Opacus' hooks on the first LoRA layers see inputs that need no gradient (frozen
# embeddings); torch warns on every backward, though per-sample gradients are
# unaffected (tests/test_privacy.py checks them against autograd).
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


class BudgetExhausted(RuntimeError):
    """Training this round would spend more than the node's privacy budget."""


def calibrate_noise(dp: DPConfig, sample_rate: float, total_steps: int) -> float:
    """Noise multiplier such that ``total_steps`` Poisson-sampled steps at
    ``sample_rate`` cost at most (dp.epsilon, dp.delta): Opacus'
    ``get_noise_multiplier`` (its search, its result to the bit; tests/test_privacy.py),
    deciding most of its comparisons from a cheaper upper bound (``_noise_search``);
    with ``dp.accountant = prv``, the same search over Opacus' PRV epsilon."""
    try:
        with _ieee_floats():
            if dp.accountant == "prv":
                from opacus.accountants.utils import get_noise_multiplier

                with np.errstate(divide="ignore"):  # log(1 - q) at q = 1 (a node smaller than a batch): handled, -inf
                    return get_noise_multiplier(
                        target_epsilon=dp.epsilon,
                        target_delta=dp.delta,
                        sample_rate=sample_rate,
                        steps=total_steps,
                        accountant="prv",
                        epsilon_tolerance=EPSILON_TOLERANCE,
                        eps_error=PRV_EPS_ERROR,
                    )
            return _noise_search(dp.epsilon, dp.delta, sample_rate, total_steps)
    except ValueError as e:  # as Opacus: "The privacy budget is too low."
        raise ConfigError(
            "dp.epsilon",
            dp.epsilon,
            f"unreachable with delta {dp.delta} over {total_steps} steps at sampling rate {sample_rate:.4g} ({e})",
        ) from e


_MAX_SIGMA = 1e6  # Opacus' bound on the search
# Orders computed at every sigma besides those around the optimum: integer orders are cheap
# (Opacus sums a finite binomial series), and lines through them bound every order between.
# Each must be one of ALPHAS: the upper bound has to be one of Opacus' per-order values.
_SKELETON = [2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 63.0, 128.0, 512.0]
# Bounds decide a comparison only this far (relative) from its threshold: far above the
# rounding of Opacus' series, so every decision is the one Opacus' exact epsilon gives.
_SLACK = 1e-7


def _noise_search(target: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' ``get_noise_multiplier`` search, step for step: double sigma until
    epsilon <= target, then bisect until target - epsilon <= EPSILON_TOLERANCE.

    Each comparison needs epsilon(sigma) only on one side of a threshold.
    Epsilon is the minimum over the orders ``ALPHAS`` of a per-order value, and
    the fractional orders cost most (at the large sampling rates of small nodes,
    ~2 ms each). So each sigma first gets two cheap bounds from a few orders
    (those around the likely optimum, and ``_SKELETON``): their minimum from
    above, and from below a bound for every order (``_order_lower_bounds``).
    Where they leave a comparison open, Opacus' epsilon decides it (``_spent``:
    computed at the orders that can hold the minimum). Every decision, hence
    the result, is the one Opacus' exact epsilon gives (tests/test_privacy.py)."""
    alphas = np.asarray(ALPHAS, dtype=float)
    window: list[float] = []  # ALPHAS around the likely optimum, once a sigma has been bounded
    state: dict[float, tuple[float, float]] = {}  # sigma -> (lower, upper) bound of epsilon; equal once exact

    def widen(x: float) -> float:
        return _SLACK * max(1.0, abs(x)) if math.isfinite(x) else 0.0

    def bounds(sigma: float) -> tuple[float, float]:
        nonlocal window
        if sigma not in state:
            orders = np.asarray(sorted(set(window) | set(_SKELETON)))
            rdp = _rdp([(sigma, sample_rate, steps)], orders)
            eps = _convert(rdp, orders, delta)
            per_order = _order_lower_bounds(orders, rdp, alphas)
            lower_eps = _convert(per_order, alphas, delta) if per_order is not None else None
            upper = float(np.nanmin(eps)) if not np.isnan(eps).all() else math.inf
            if lower_eps is None or np.isnan(lower_eps).any():  # no bound for some order: none at all
                state[sigma] = (-math.inf, upper)
            else:
                best = int(np.argmin(lower_eps))  # the likely optimum: look around it next
                window = [float(a) for a in ALPHAS[max(0, best - 4) : best + 5]]
                state[sigma] = (float(lower_eps[best]), upper)
        lower, upper = state[sigma]
        return lower - widen(lower), upper + widen(upper)

    def decide(sigma: float, holds) -> bool:
        """``holds(epsilon)`` at sigma, for a ``holds`` monotone in epsilon: from the bounds
        where it is the same at both ends, else from Opacus' epsilon (``_spent``, which
        reuses the orders already computed)."""
        lower, upper = bounds(sigma)
        if holds(lower) == holds(upper):
            return holds(upper)
        eps = _spent([(sigma, sample_rate, steps)], delta)[0]
        state[sigma] = (eps, eps)
        return holds(eps)

    if not math.inf > target:  # as Opacus: an infinite (or NaN) target skips both loops
        return 10.0
    # Doubling: Opacus stops at the first sigma_high whose epsilon is <= target.
    sigma_low, sigma_high = 0.0, 10.0
    while True:
        sigma_high = 2 * sigma_high
        if sigma_high > _MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
        if not decide(sigma_high, lambda eps: eps > target):
            break
    # Bisection: until target - epsilon(sigma_high) <= tolerance.
    while decide(sigma_high, lambda eps: target - eps > EPSILON_TOLERANCE):
        sigma = (sigma_low + sigma_high) / 2
        if decide(sigma, lambda eps: eps < target):
            sigma_high = sigma
        else:
            sigma_low = sigma
    return sigma_high


def _convert(rdp: np.ndarray, orders: np.ndarray, delta: float) -> np.ndarray:
    """Each order's epsilon from its RDP: Opacus' conversion (``get_privacy_spent``),
    before its minimum over the orders."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)


def _order_lower_bounds(orders: np.ndarray, rdp: np.ndarray, alphas: np.ndarray) -> np.ndarray | None:
    """A lower bound of the RDP at every order of ``alphas`` from the RDP at ``orders``
    (None where some of those is not finite).

    (order - 1) x RDP(order) is the log of a moment of the privacy loss, so it is
    convex in the order, 0 at orders 0 and 1 and >= 0 above 1. A line through two
    neighbouring known points lies below it outside their interval: between two
    known orders, the lines through the pairs to either side bound it from below."""
    if not np.all(np.isfinite(rdp)):
        return None
    x = np.concatenate(([0.0, 1.0], orders))
    f = np.concatenate(([0.0, 0.0], rdp * (orders - 1)))
    j = np.searchsorted(x, alphas, side="right")  # x[j - 1] <= alpha < x[j]
    moment = np.zeros(len(alphas))
    left = j >= 2  # the line through x[j - 2] and x[j - 1], extended right
    a, b = j[left] - 2, j[left] - 1
    moment[left] = np.maximum(moment[left], f[b] + (f[b] - f[a]) / (x[b] - x[a]) * (alphas[left] - x[b]))
    right = j + 1 < len(x)  # the line through x[j] and x[j + 1], extended left
    a, b = j[right], j[right] + 1
    moment[right] = np.maximum(moment[right], f[a] + (f[b] - f[a]) / (x[b] - x[a]) * (alphas[right] - x[a]))
    known = x[j - 1] == alphas
    moment[known] = f[j[known] - 1]
    return moment / (alphas - 1)


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a mechanism history.

    ``rdp``: by Opacus' RDP accountant: its sum over the history of per-step RDP
    x steps, then its conversion to (epsilon, delta) and the minimum over the
    orders, so the result is Opacus' ``RDPAccountant.get_epsilon`` to the bit
    (tests/test_privacy.py), computed at the orders that can hold the minimum
    only (``_spent``). ``prv``: Opacus' ``PRVAccountant.get_epsilon``, an upper
    bound within ``PRV_EPS_ERROR`` of the true epsilon."""
    if not history:
        return 0.0
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"unknown accountant {accountant!r}")
    with _ieee_floats():
        if accountant == "prv":
            return _prv_epsilon(_merged(history), float(delta))
        return _spent(history, delta)[0]


def _merged(history: Sequence[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """The history with consecutive entries of one (noise, rate) merged, as Opacus'
    ``PRVAccountant.step`` keeps it: the same composition, and one discretisation of it,
    whether the steps were recorded in one entry or several (a ledger's ``epsilon_after``
    and, once recorded, its ``epsilon``)."""
    out: list[tuple[float, float, int]] = []
    for s, q, n in history:
        if out and out[-1][:2] == (float(s), float(q)):
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(n))
        else:
            out.append((float(s), float(q), int(n)))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    # A node asks for the same history's epsilon several times a round (check, record, report);
    # each PRV composition takes 0.2-0.5 s.
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = list(history)
    with np.errstate(divide="ignore"):  # as in calibrate_noise
        return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


@contextlib.contextmanager
def _ieee_floats():
    """Compute with denormal floats on the calling thread, whatever training left set.

    Training flushes denormals to zero for the rest of the process (``training.flush_denormals``),
    and under that flag Opacus' RDP at the largest orders comes out NaN (its terms underflow
    through the denormal range), so the minimum over the orders skipped them: a process that
    had trained reported a larger epsilon (or noise) than one that had not where such an order
    was optimal (tiny epsilons). The accountant's numpy runs on the calling thread, so switching
    the flag off there for the call (and back on after) makes every result the IEEE one."""
    flushing = sys.float_info.min * 0.5 == 0.0  # a denormal result comes out 0 only when flushing
    if flushing:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(True)


def _spent(history: Sequence[tuple[float, float, int]], delta: float) -> tuple[float, float]:
    """(epsilon, the optimal order) of a non-empty history: Opacus' ``get_privacy_spent``
    over ``ALPHAS``, each order's epsilon computed as Opacus does, but only at the orders
    whose lower bound (``_order_lower_bounds``, from ``_SKELETON`` and the orders around
    its optimum) does not exceed an epsilon already computed: the minimum is among them.
    The fractional orders cost most (at the large sampling rates of small nodes, the full
    set takes ~0.1-0.5 s), and each new node size needs its own."""
    alphas = np.asarray(ALPHAS, dtype=float)
    orders = np.asarray(_SKELETON)
    lower = _order_lower_bounds(orders, _rdp(history, orders), alphas)
    first = _convert(lower, alphas, delta) if lower is not None else None
    if first is None or np.isnan(first).any():
        known = alphas  # no bound (an infinite RDP, an invalid delta): every order
    else:
        best = int(np.argmin(first))
        orders = np.asarray(sorted(set(_SKELETON) | set(ALPHAS[max(0, best - 4) : best + 5])))
        rdp = _rdp(history, orders)
        eps = _convert(rdp, orders, delta)
        upper = float(np.nanmin(eps)) if not np.isnan(eps).all() else math.inf
        lower = _order_lower_bounds(orders, rdp, alphas)
        if lower is None or not math.isfinite(upper):
            known = alphas
        else:  # an order whose lower bound exceeds a computed epsilon cannot hold the minimum
            lower_eps = _convert(lower, alphas, delta)
            slack = _SLACK * max(1.0, abs(upper))
            known = alphas[np.isin(alphas, orders) | ~(lower_eps - _SLACK * np.maximum(1.0, np.abs(lower_eps)) > upper + slack)]
    eps = _convert(_rdp(history, known), known, delta)
    if np.isnan(eps).all():
        return math.inf, math.nan  # as Opacus: no privacy
    i = int(np.nanargmin(eps))
    return float(eps[i]), float(known[i])


# (noise multiplier, sample rate) -> {order: per-step RDP}, least recently used first.
_PER_STEP: collections.OrderedDict[tuple[float, float], dict[float, float]] = collections.OrderedDict()
_PER_STEP_MAX = 4096


def _rdp(history: Sequence[tuple[float, float, int]], orders: np.ndarray) -> np.ndarray:
    """The RDP of ``history`` at ``orders`` as Opacus sums it (its ``compute_rdp`` per
    entry, times the steps, summed in order), each (noise, rate)'s per-step RDP at each
    order computed once per process."""
    total: Any = 0
    for sigma, q, steps in history:
        key = (float(sigma), float(q))
        known = _PER_STEP.pop(key, None) or {}
        _PER_STEP[key] = known  # most recently used last
        if len(_PER_STEP) > _PER_STEP_MAX:
            _PER_STEP.popitem(last=False)
        missing = [float(o) for o in orders if float(o) not in known]
        if missing:
            from opacus.accountants.analysis import rdp as analysis

            known.update(zip(missing, analysis.compute_rdp(q=key[1], noise_multiplier=key[0], steps=1, orders=missing), strict=True))
        total = total + np.asarray([known[float(o)] for o in orders]) * int(steps)
    return np.asarray(total, dtype=float)


@dataclass
class PrivacyLedger:
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    history: list[tuple[float, float, int]] = field(default_factory=list)
    accountant: str = "rdp"  # a ledger stored before the choice existed was RDP's

    @classmethod
    def plan(cls, dp: DPConfig, num_examples: int, batch_size: int, planned_steps: int) -> PrivacyLedger:
        """Calibrate once for the whole run: every local step of every round."""
        sample_rate = min(1.0, batch_size / num_examples)
        sigma = calibrate_noise(dp, sample_rate, planned_steps)
        return cls(dp.epsilon, dp.delta, sigma, sample_rate, planned_steps, accountant=str(dp.accountant))

    @property
    def steps_spent(self) -> int:
        return sum(int(h[2]) for h in self.history)

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_after(self, steps: int) -> float:
        return epsilon_of(self.history + [(self.noise_multiplier, self.sample_rate, steps)], self.delta, self.accountant)

    def check(self, steps: int) -> float:
        """Raise unless ``steps`` more steps stay within the budget; return the epsilon they would reach."""
        after = self.epsilon_after(steps)
        if after > self.target_epsilon * (1 + 1e-9):
            raise BudgetExhausted(
                f"privacy budget exhausted: {self.steps_spent} steps spent (epsilon {self.epsilon():.3f}); "
                f"{steps} more would reach epsilon {after:.3f} > target {self.target_epsilon} (delta {self.delta})"
            )
        return after

    def record(self, steps: int) -> None:
        if steps <= 0:
            return
        last = self.history[-1] if self.history else None
        if last and last[0] == self.noise_multiplier and last[1] == self.sample_rate:
            self.history[-1] = (last[0], last[1], int(last[2]) + steps)
        else:
            self.history.append((self.noise_multiplier, self.sample_rate, steps))

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        d = json.loads(text)
        d["history"] = [tuple(h) for h in d["history"]]
        return cls(**d)


def wrap_model(model: nn.Module, hooks: str = "output") -> nn.Module:
    """Per-sample gradients for the trainable parameters: Opacus' ``GradSampleModule``
    (hooks mode), its backward hooks on each hooked module's output tensor
    (``hooks="output"``, ``_OutputHooks``) or, as Opacus registers them, on the module
    (``hooks="module"``; benchmarks compare the two)."""
    from opacus import GradSampleModule

    if hooks not in ("output", "module"):
        raise ValueError(f"hooks must be 'output' or 'module', not {hooks!r}")
    model.train()  # Opacus requires train mode when wrapping
    cls = _output_hooks_class() if hooks == "output" else GradSampleModule
    return cls(model, batch_first=True, loss_reduction="mean")


def linear_grad_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor, scale: float = 1.0) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an ``nn.Linear`` layer: what Opacus'
    ``compute_linear_grad_sample`` returns, computed as one batched matmul whose
    output rows are the layer's smaller side. Opacus' einsum always makes the
    output side the rows, which for a LoRA B (rank 8 in, 384 out) is the slow
    orientation on CPU: in a LoRA DP step at batch 16 x 64 tokens the Linear samplers
    took 2.8 ms against 5.7 ms with Opacus' einsum (``benchmarks/dp_ops.py``). Equal
    to Opacus' up to float rounding (the sum over tokens runs in another order).
    The result may be a transposed view; the hooks store it contiguous.

    ``scale`` multiplies the gradients. Opacus multiplies a hooked module's whole
    output gradient by the batch size for a mean-reduced loss before its sampler
    runs; ``_OutputHooks`` passes that factor here instead, where it multiplies the
    smaller operand (for a LoRA layer the rank-8 side, 1/48 of the output gradient
    of a LoRA B on MiniLM)."""
    x = activations[0].to(backprops.dtype)
    n, d_in, d_out = backprops.shape[0], x.shape[-1], backprops.shape[-1]
    g = backprops.reshape(n, -1, d_out)  # any middle dimensions (tokens) flattened
    ret = {}
    if layer.weight.requires_grad:
        x = x.reshape(n, -1, d_in)
        gw = g
        if scale != 1.0:
            if x.numel() <= g.numel():
                x = x * scale
            else:
                gw = g * scale
        if d_in < d_out:
            ret[layer.weight] = torch.bmm(x.transpose(1, 2), gw).transpose(1, 2)
        else:
            ret[layer.weight] = torch.bmm(gw.transpose(1, 2), x)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.sum(1) if scale == 1.0 else g.sum(1) * scale
    return ret


@functools.cache
def _output_hooks_class() -> type:
    from opacus import GradSampleModule
    from opacus.grad_sample.functorch import prepare_layer

    class _OutputHooks(GradSampleModule):
        """Opacus' ``GradSampleModule`` with the backward half of each module's hooks
        registered on its output tensor, from the forward hook, instead of as a full
        module backward hook. The per-sample gradients are Opacus' own code (its grad
        samplers, accumulation and clipping state), fed the same output gradient; what
        goes is the pair of Python autograd Functions a full backward hook wraps around
        every hooked module's inputs and outputs on every forward: 0.2-2.3 points of a
        step on CPU, about the noise of the measurement (``benchmarks/dp_ops.py``).
        Linear layers use ``linear_grad_sample`` (a copy of the table: Opacus' own
        registry, used by its other classes, is left as it is)."""

        GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.Linear: linear_grad_sample}
        # Samplers that take the loss reduction's factor as ``scale`` (see capture_backprops_hook).
        SCALING_SAMPLERS = {nn.Linear: linear_grad_sample}

        def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False) -> None:
            if hasattr(self._module, "autograd_grad_sample_hooks"):
                raise ValueError("Trying to add hooks twice to the same model")
            self._module.autograd_grad_sample_hooks = []
            self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
            for module in self.iterate_submodules(self._module):
                if force_functorch or self._get_module_type(module) not in self.GRAD_SAMPLERS:
                    prepare_layer(module, batch_first=batch_first)
                hook = functools.partial(self._capture, loss_reduction=loss_reduction, batch_first=batch_first)
                self.autograd_grad_sample_hooks.append(module.register_forward_hook(hook))
            self.enable_hooks()

        def _capture(self, module: nn.Module, inputs, output, *, loss_reduction: str, batch_first: bool) -> None:
            saved = len(getattr(module, "activations", ()))
            self.capture_activations_hook(module, inputs, output)
            if len(getattr(module, "activations", ())) == saved:
                return  # not captured: no grad, eval mode or hooks disabled
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"per-sample gradients need a module with one tensor output, not {type(module).__name__}")

            def backward(grad: torch.Tensor) -> None:
                self.capture_backprops_hook(module, None, (grad,), loss_reduction=loss_reduction, batch_first=batch_first)

            output.register_hook(backward)

        def capture_backprops_hook(self, module: nn.Module, _forward_input, forward_output, loss_reduction: str, batch_first: bool) -> None:
            """Opacus' hook, with a shorter path for the layers of ``SCALING_SAMPLERS``
            (Linear: every LoRA layer): the mean-reduction factor goes to the sampler
            (``linear_grad_sample`` applies it to its smaller operand)
            instead of multiplying the whole output gradient, and a per-sample gradient
            of the full batch becomes the parameter's buffer instead of being copied
            into a zero-filled one. A LoRA DP step on MiniLM at batch 16 x 64 tokens
            multiplied 12 output gradients of 16 x 64 x 384 floats and zero-filled and
            copied 24 buffers for nothing (``benchmarks/dp_ops.py``)."""
            sampler = self.SCALING_SAMPLERS.get(type(module))
            if sampler is None or not self.hooks_enabled or self.force_functorch:
                return super().capture_backprops_hook(module, _forward_input, forward_output, loss_reduction, batch_first)
            from opacus.grad_sample.grad_sample_module import create_or_accumulate_grad_sample, promote_current_grad_sample
            from opacus.utils.module_utils import trainable_parameters

            backprops = forward_output[0].detach()
            activations, backprops = self.rearrange_grad_samples(module=module, backprops=backprops, loss_reduction="sum", batch_first=batch_first)
            n = module.max_batch_len
            scale = float(n) if loss_reduction == "mean" else 1.0
            for param, gs in sampler(module, activations, backprops, scale).items():
                if param.requires_grad and gs.shape[0] == n and not hasattr(param, "_current_grad_sample"):
                    param._current_grad_sample = gs.contiguous()  # the clipping reads it flat
                else:  # a module called more than once per batch: Opacus' accumulation
                    create_or_accumulate_grad_sample(param=param, grad_sample=gs, max_batch_len=n)
            for _, p in trainable_parameters(module):
                p._forward_counter -= 1
                if p._forward_counter == 0:
                    promote_current_grad_sample(p)
                if not self.grad_accumulation_allowed and isinstance(p.grad_sample, list) and len(p.grad_sample) > 1:
                    raise ValueError(
                        "Poisson sampling is not compatible with accumulating per-sample gradients over several backward passes: call step() after each"
                    )
            if not module.activations and hasattr(module, "max_batch_len"):
                del module.max_batch_len

    return _OutputHooks


def reset_per_sample_state(model: nn.Module) -> None:
    """Drop any per-sample state Opacus left on a (shared) model, e.g. after a
    round that failed between backward and step, or between the micro-batches
    of a logical batch (``training.train``): left in place it would be merged
    into the next node's clipped sum."""
    for module in model.modules():
        module.__dict__.pop("activations", None)
        module.__dict__.pop("max_batch_len", None)
    for p in model.parameters():
        p.grad = None
        if hasattr(p, "_current_grad_sample"):
            del p._current_grad_sample
        if hasattr(p, "grad_sample"):
            p.grad_sample = None  # Opacus expects the attribute to exist
        if hasattr(p, "summed_grad"):
            p.summed_grad = None  # the clipped sum of the micro-batches so far
        if hasattr(p, "_forward_counter"):
            p._forward_counter = 0


# -- randomness for deployments: a cryptographically secure generator -------------------


def secure_bytes(n: int) -> bytes:
    """``n`` cryptographically secure random bytes: the ChaCha20 keystream under a fresh
    256-bit key from ``os.urandom`` (the construction of the Linux kernel's own generator),
    ~3x faster than reading megabytes from ``os.urandom`` itself. A key is never reused, so
    the all-zero nonce is safe."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    return Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None).encryptor().update(bytes(n))


def secure_uniform(n: int) -> np.ndarray:
    """``n`` floats uniform in (0, 1], 53 random bits each, from ``secure_bytes``.
    (The top 53 bits of each 64-bit word: an arithmetic shift of the signed word, then
    a mask, gives the same bits as a logical shift; in torch, as it was faster than numpy here.)"""
    bits = torch.frombuffer(bytearray(secure_bytes(8 * n)), dtype=torch.int64)
    return ((bits >> 11) & ((1 << 53) - 1)).double().add_(1.0).mul_(2.0**-53).numpy()


def secure_gaussian(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """N(0, std^2) noise from ``secure_uniform`` (Box-Muller). As in Opacus'
    secure_mode (Holohan & Braghin 2021), it is the sum of 4 draws of std/2,
    which defeats attacks on the floating-point representation of one draw.
    Both outputs of each Box-Muller pair are used (half the random bytes and
    arithmetic), never both in one sum: a pair's two outputs summed would be a
    single scaled Box-Muller draw again.

    Layout, for ``n >= 2`` values and pairs 0 .. 2n-1: value i sums the cosine
    outputs of pairs i and n+i and the sine outputs of pairs i-1 and n+i-1
    (mod 2n), four different pairs; one value takes four pairs' cosines."""
    n = int(np.prod(shape)) if shape else 1
    pairs = 2 * n if n >= 2 else 4 * n
    # float64 throughout, in torch: its vectorised log/cos/sin beat numpy's (benchmarks/speed.py, [1']).
    u1, u2 = torch.from_numpy(secure_uniform(pairs)), torch.from_numpy(secure_uniform(pairs))
    r, theta = torch.sqrt(-2.0 * torch.log(u1)), (2.0 * math.pi) * u2
    if n >= 2:  # slices, not an index array: no gather over the 4n draws
        z = (r * torch.cos(theta)).reshape(2, n).sum(0) + torch.roll(r * torch.sin(theta), 1).reshape(2, n).sum(0)
    else:
        z = (r * torch.cos(theta)).sum(0, keepdim=True)
    return (z * (std / 2.0)).float().reshape(shape)


def secure_gaussians(shapes: Sequence[tuple[int, ...]], std: float) -> list[torch.Tensor]:
    """``secure_gaussian`` noise for several tensors from one draw, split by shape: a DP
    step draws for all its parameters at once (26 tensors for LoRA on MiniLM), which
    saves each tensor's key setup and Python overhead."""
    sizes = [int(np.prod(s)) if s else 1 for s in shapes]
    flat = secure_gaussian((sum(sizes),), std)
    return [part.reshape(s) for part, s in zip(flat.split(sizes), shapes, strict=True)]


def dp_optimizer(
    optimizer: torch.optim.Optimizer,
    ledger: PrivacyLedger | None,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None,
    groups: Sequence[int] | None = None,
    group_norms: Sequence[float] | None = None,
):
    """Clip each sample's gradient to ``max_grad_norm`` and add Gaussian noise
    of the ``ledger``'s multiplier; ``ledger = None``: clipping only, no noise
    (training without DP that is DP-SGD minus the noise).

    A seeded ``generator`` makes research runs reproducible (and predictable:
    experiments only); ``None`` (deployments) draws the noise from a
    cryptographically secure generator instead.

    Group-wise clipping: ``groups`` gives each of the optimizer's parameters
    (in order) a group index, and each sample's gradient restricted to group g
    is clipped to ``group_norms[g]``. The whole per-sample gradient then has
    norm <= sqrt(sum of group_norms²), which must equal ``max_grad_norm``: the
    sensitivity, hence the noise and the accountant, are those of flat clipping
    at ``max_grad_norm``. Opacus' per-layer clipping is the special case of one
    group per tensor."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class NoiseOnCPU(DPOptimizer):
        """Opacus' add_noise, with the noise drawn on the CPU and moved to the
        parameters' device: from ``secure_gaussian`` (deployments), or
        from the seeded CPU ``generator`` (research runs: the same noise on
        every device; Opacus would draw on the parameters' device, where a CPU
        generator cannot be used). Float32 whatever the model's precision."""

        noise_source = "secure" if generator is None else "seeded generator"

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            secure = None
            if std != 0 and generator is None:
                secure = iter(secure_gaussians([tuple(p.summed_grad.shape) for p in self.params], std))
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                if std == 0:  # clipping only (no DP): nothing to draw
                    p.grad = p.summed_grad.clone().view_as(p)
                else:
                    # Seeded: one draw per tensor in order, as the committed research runs drew.
                    noise = next(secure) if secure is not None else torch.normal(mean=0.0, std=std, size=tuple(p.summed_grad.shape), generator=generator)
                    p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)
                _mark_as_processed(p.summed_grad)

    class GroupClipping(NoiseOnCPU):
        """NoiseOnCPU with group-wise clipping (see ``dp_optimizer``)."""

        def clip_and_accumulate(self) -> None:
            samples = [self._get_flat_grad_sample(p) for p in self.params]
            norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in samples]
            factors = []
            for g, bound in enumerate(group_norms):
                members = [n for n, k in zip(norms, groups, strict=True) if k == g]
                if not members:  # a group with no parameter (e.g. nothing of it trained)
                    factors.append(None)
                    continue
                group_norm = torch.stack(members, dim=1).norm(2, dim=1)
                factors.append((bound / (group_norm + 1e-6)).clamp(max=1.0))
            for p, grad_sample, g in zip(self.params, samples, groups, strict=True):
                _check_processed_flag(p.grad_sample)
                grad_sample = grad_sample.to(p.dtype)
                grad = torch.einsum("i,i...", factors[g].to(grad_sample), grad_sample)
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
                _mark_as_processed(p.grad_sample)

    cls = NoiseOnCPU
    if groups is not None:
        assert group_norms is not None and len(groups) == len([p for g in optimizer.param_groups for p in g["params"]])
        total = math.sqrt(sum(c * c for c in group_norms))
        if not math.isclose(total, max_grad_norm, rel_tol=1e-6):
            raise ValueError(f"group clipping norms {list(group_norms)} add up (in squares) to {total}, not to max_grad_norm {max_grad_norm}")
        cls = GroupClipping
    return cls(
        optimizer,
        noise_multiplier=0.0 if ledger is None else ledger.noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )


def poisson_batches(num_examples: int, sample_rate: float, steps: int, generator: torch.Generator | None):
    """``steps`` batches, each example included independently with ``sample_rate``
    (the sampling the RDP accountant assumes). ``generator=None`` draws the
    inclusion coins from a cryptographically secure generator (deployments)."""
    if generator is None:
        return ((np.nonzero(secure_uniform(num_examples) <= sample_rate)[0]).tolist() for _ in range(steps))
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    return iter(UniformWithReplacementSampler(num_samples=num_examples, sample_rate=sample_rate, generator=generator, steps=steps))
