"""Run-config ``strategy`` name -> strategy class."""

from ..config import ConfigError
from .base import FedLoraStrategy
from .ffa_lora import FfaLoraStrategy
from .lora import LoraStrategy

STRATEGIES: dict[str, type[FedLoraStrategy]] = {cls.name: cls for cls in (LoraStrategy, FfaLoraStrategy)}


def get_strategy(name: str) -> type[FedLoraStrategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError("strategy", name, f"unknown strategy; choose one of {', '.join(STRATEGIES)}") from None
