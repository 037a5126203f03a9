"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated
Learning", ICLR 2024): A is drawn once from the run seed and frozen on every
node; only B is trained and sent. Because every client shares A,
mean(B_k)·A = mean(B_k·A): aggregation is exact, and uploads are half of LoRA's
(for square targets, as in attention's query/value)."""

from .base import FedLoraStrategy


class FfaLoraStrategy(FedLoraStrategy):
    name = "ffa-lora"
    train_lora_a = False
    exact_aggregation = True
