"""Run-config ``strategy`` name -> strategy class: the classes register
themselves (``FedLoraStrategy.__init_subclass__``) into ``config.STRATEGY_REGISTRY``."""

from ..config import STRATEGY_REGISTRY, ConfigError

STRATEGIES = STRATEGY_REGISTRY  # a read-only mapping: name -> FedLoraStrategy subclass


def get_strategy(name: str) -> type:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError("strategy", name, f"unknown strategy; choose one of {', '.join(STRATEGIES)}") from None
