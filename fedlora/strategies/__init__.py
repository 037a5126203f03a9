"""Server-side federated LoRA strategies, one module per method."""

from .base import FedLoraStrategy, RoundStats
from .ffa_lora import FfaLoraStrategy
from .lora import LoraStrategy
from .registry import STRATEGIES, get_strategy

__all__ = ["FedLoraStrategy", "FfaLoraStrategy", "LoraStrategy", "RoundStats", "STRATEGIES", "get_strategy"]
