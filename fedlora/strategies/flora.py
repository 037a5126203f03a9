"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024): aggregation by stacking.

Each round every client starts LoRA afresh (A drawn from the run seed, B = 0)
and trains A and B. The server stacks the factors, B_stack = [w_1 B_1 .. w_K B_K]
and A_stack = [A_1; ..; A_K] (weights w_k = n_k / sum n), so that
B_stack A_stack = sum_k w_k B_k A_k exactly, and merges s B_stack A_stack
(s = alpha / r) into the frozen base weights. Clients may have different ranks:
stacking needs only matching outer dimensions. The server sends the cumulative
base update (``wire.add_base_delta``: stacked factors while fewer bytes than
dense, then dense) and the head if it trains, never the factors, which every
node re-draws itself. The global model is base + cumulative update (+ head);
its LoRA factors stay at the restart values (B = 0).
"""

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from .. import wire
from .base import FedLoraStrategy, factor_keys, weighted_replies


class FloraStrategy(FedLoraStrategy):
    name = "flora"
    exchange = wire.Exchange(a_down=False, b_down=False, restart=True, base_delta=True)
    exact_aggregation = True
    robust_ok = False
    user_dp_ok = False  # the base update is not a mean of clipped updates
    mixed_ranks = "stacking"
    merge_needs_start = "the round's starting state"  # the factors go back to its restart values

    def merge_state(self, state: dict[str, np.ndarray], aggregated: ArrayRecord, replies: list[RecordDict]) -> None:
        clients = weighted_replies(replies)
        for ka, kb in factor_keys(aggregated.keys()):
            u = self.lora_scale * np.concatenate([w * c[kb] for w, c in clients], axis=1)
            v = np.concatenate([c[ka] for _, c in clients], axis=0)
            wire.add_base_delta(state, wire.lora_module(ka), u, v)
            state[ka], state[kb] = self.current[ka].numpy(), self.current[kb].numpy()  # restart values
