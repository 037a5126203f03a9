"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated
Learning", ICLR 2024): A is drawn once from the run seed and frozen on every
node; only B is trained and sent. Because every client shares A,
mean(B_k)·A = mean(B_k·A): aggregation is exact, and uploads are half of LoRA's
(for square targets, as in attention's query/value)."""

from .. import wire
from .base import FedLoraStrategy


class FfaLoraStrategy(FedLoraStrategy):
    name = "ffa-lora"
    exchange = wire.Exchange(train_a=False, a_down=False)
    exact_aggregation = True
    mixed_ranks = ""  # A is frozen at a shared init that every node must hold identically
