"""Run-config ``strategy`` name -> strategy class."""

from ..config import ConfigError
from .base import FedLoraStrategy
from .fedex_lora import FedExLoraStrategy
from .fedsa_lora import FedSaLoraStrategy
from .fedsvd import FedSvdStrategy
from .ffa_lora import FfaLoraStrategy
from .flora import FloraStrategy
from .lora import LoraStrategy

STRATEGIES: dict[str, type[FedLoraStrategy]] = {
    cls.name: cls
    for cls in (LoraStrategy, FfaLoraStrategy, FedExLoraStrategy, FloraStrategy, FedSaLoraStrategy, FedSvdStrategy)
}


def get_strategy(name: str) -> type[FedLoraStrategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError("strategy", name, f"unknown strategy; choose one of {', '.join(STRATEGIES)}") from None
