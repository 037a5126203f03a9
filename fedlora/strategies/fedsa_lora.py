"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", ICLR 2025): A learns what is general, B what is
client-specific, so only A is shared.

Clients train A and B; they send A (and the head, if it trains) and keep B in
their node state (``cache-dir/personal/``, per run and node, across rounds and
processes). The server averages A (example-weighted) and never sees a B.
Evaluation: the *global* model, evaluated centrally, is mean(A) with B = 0 —
the only B the server holds — so its LoRA layers add nothing and it is the base
model with the averaged head; the *personalised* models (mean(A) + each
client's own B) are evaluated on each client's held-out split when
``fraction-evaluate`` > 0 (``client_eval_accuracy`` in metrics.jsonl).
"""

from .. import wire
from .base import FedLoraStrategy


class FedSaLoraStrategy(FedLoraStrategy):
    name = "fedsa-lora"
    exchange = wire.Exchange(b_down=False, b_up=False)
    exact_aggregation = False  # the global model is not the clients' mean model (B is personal)
