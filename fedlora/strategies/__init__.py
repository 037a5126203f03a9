"""Server-side federated LoRA strategies, one module per method.

Importing the package imports every module in it; each ``FedLoraStrategy``
subclass registers itself under its ``name`` (``STRATEGIES``, the run config's
``strategy`` choices) and is exported here under its class name. A new method is
one new module: no list to edit (see ``FedLoraStrategy``'s docstring).
"""

import importlib
import pkgutil

from .base import FedLoraStrategy, RoundStats
from .registry import STRATEGIES, get_strategy

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# Every registered class, by its class name (FfaLoraStrategy, ...).
_CLASSES = {cls.__name__: cls for cls in STRATEGIES.values()}
globals().update(_CLASSES)

__all__ = ["STRATEGIES", "FedLoraStrategy", "RoundStats", "get_strategy"]
__all__.extend(sorted(_CLASSES))
