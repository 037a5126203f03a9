"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for
Federated and Efficient Fine-Tuning of Large Language Models", ACL 2025, arXiv:2410.09432).

Clients train A and B as in LoRA and the server averages each factor
(weights w_k = n_k / sum n). The mean of the products differs from the product
of the means by the residual

    R = sum_k w_k B_k A_k - mean(B) mean(A),

which the server folds, times the LoRA scale s = alpha / r, into the frozen
base weight of every layer: W + s R + s mean(B) mean(A) = W + s sum_k w_k B_k A_k,
exactly. R is a product of stacked factors ([w_1 B_1 .. w_K B_K, -mean(B)] by
[A_1; ..; A_K; mean(A)], rank <= (K+1) r); the server keeps the cumulative
update of all rounds (``wire.add_base_delta``: stacked factors while fewer bytes
than dense) and sends it whole each round, so every node, including a fresh
process or one that missed rounds, holds the current base. Under DP the
residual is computed from DP-trained factors: post-processing, no extra cost.
"""

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from .. import wire
from .base import FedLoraStrategy, factor_keys, weighted_replies


class FedExLoraStrategy(FedLoraStrategy):
    name = "fedex-lora"
    exchange = wire.Exchange(base_delta=True)
    exact_aggregation = True
    robust_ok = False
    user_dp_ok = False  # the base update is not a mean of clipped updates

    def merge_state(self, state: dict[str, np.ndarray], aggregated: ArrayRecord, replies: list[RecordDict]) -> None:
        clients = weighted_replies(replies)
        for ka, kb in factor_keys(aggregated.keys()):
            # The global factors as stored (float32), so that the fold is exact for them.
            mean_a, mean_b = (np.asarray(aggregated[k].numpy(), np.float64) for k in (ka, kb))
            u = self.lora_scale * np.concatenate([w * c[kb] for w, c in clients] + [-mean_b], axis=1)
            v = np.concatenate([c[ka] for _, c in clients] + [mean_a], axis=0)
            wire.add_base_delta(state, wire.lora_module(ka), u, v)
