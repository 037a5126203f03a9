"""Server-side federated LoRA strategies, one module per method."""

from .base import FedLoraStrategy, RoundStats
from .fedex_lora import FedExLoraStrategy
from .fedsa_lora import FedSaLoraStrategy
from .fedsvd import FedSvdStrategy
from .ffa_lora import FfaLoraStrategy
from .flora import FloraStrategy
from .lora import LoraStrategy
from .registry import STRATEGIES, get_strategy

__all__ = [
    "FedExLoraStrategy", "FedLoraStrategy", "FedSaLoraStrategy", "FedSvdStrategy", "FfaLoraStrategy",
    "FloraStrategy", "LoraStrategy", "RoundStats", "STRATEGIES", "get_strategy",
]
