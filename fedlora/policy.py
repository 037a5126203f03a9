"""The data owner's privacy policy, applied on the node: the run config's privacy
settings are the server's requests, the node's own config decides.

``check_run`` is asked at every message, before any work; the lifetime budget
(``check_lifetime``) when a node with its own data first trains in a run; the
evaluation limits (``check_eval``) before each evaluate message. A refusal
names the run-config key the server asked too much of, never a value of the
node's data; the node's log has the details.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import privacy
from .config import NodeConfig, RunConfig, policy_binds


class PolicyRefusal(RuntimeError):
    """The run asks for something this node's privacy policy does not allow."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key  # the run-config key the request came from (public)
        super().__init__(f"refused by this node's privacy policy ({key}): {reason}")


def check_run(run: RunConfig, node: NodeConfig, node_config: Mapping[str, Any]) -> None:
    """Refuse a run whose sample-level DP (budget, accountant) or model the policy does not allow."""
    if not policy_binds(node, node_config):
        return
    p = node.privacy
    if not run.dp.enabled:
        if not p.allow_non_private:
            raise PolicyRefusal("dp.epsilon", "the run asks for no sample-level DP (dp.epsilon = 0); set privacy.allow-non-private = true to allow it")
    else:
        if run.dp.epsilon > p.max_epsilon:
            raise PolicyRefusal("dp.epsilon", f"the run asks for epsilon {run.dp.epsilon:g} > privacy.max-epsilon = {p.max_epsilon:g}")
        if run.dp.delta > p.max_delta:
            raise PolicyRefusal("dp.delta", f"the run asks for delta {run.dp.delta:g} > privacy.max-delta = {p.max_delta:g}")
        if run.dp.accountant not in p.accountants:
            allowed = ",".join(p.accountants)
            raise PolicyRefusal("dp.accountant", f"the run asks for the {run.dp.accountant} accountant; privacy.accountants = {allowed}")
    if p.allowed_models and run.model not in p.allowed_models:
        raise PolicyRefusal("model", f"model {run.model!r} is not in privacy.allowed-models")


def check_lifetime(node: NodeConfig, other_runs: list[tuple[float, float, int]], planned: privacy.PrivacyLedger) -> float:
    """Refuse a run whose whole plan, composed with every other run on this data
    source (their mechanisms composed), would pass ``privacy.lifetime-epsilon``; return
    that epsilon, by the run's accountant (the histories are the same for either)."""
    p = node.privacy
    whole = [*other_runs, (planned.noise_multiplier, planned.sample_rate, planned.planned_steps)]
    epsilon = privacy.epsilon_of(whole, p.max_delta, planned.accountant)
    if p.lifetime_epsilon > 0 and epsilon > p.lifetime_epsilon * (1 + 1e-9):
        spent = privacy.epsilon_of(other_runs, p.max_delta, planned.accountant)
        raise PolicyRefusal(
            "dp.epsilon",
            f"this data source has spent epsilon {spent:.3f} in other runs; this run's plan "
            f"would bring it to {epsilon:.3f} > privacy.lifetime-epsilon = {p.lifetime_epsilon:g} "
            f"(delta {p.max_delta:g})",
        )
    return epsilon


def check_eval(node: NodeConfig, node_config: Mapping[str, Any], queries_so_far: int) -> None:
    """Refuse client-side evaluation unless allowed, and past the per-run cap.
    Its metrics are released without DP, so each answer is a query of the data."""
    if not policy_binds(node, node_config):
        return
    p = node.privacy
    if not p.allow_client_eval:
        raise PolicyRefusal("fraction-evaluate", "client-side evaluation is off (privacy.allow-client-eval = false)")
    if queries_so_far >= p.max_eval_queries:
        raise PolicyRefusal("fraction-evaluate", f"{queries_so_far} evaluate messages answered in this run: privacy.max-eval-queries = {p.max_eval_queries}")
