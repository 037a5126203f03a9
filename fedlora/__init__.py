"""fedlora: federated LoRA and FFA-LoRA fine-tuning under differential privacy, on Flower."""

from . import logs as _logs  # noqa: F401  (installs the filters for known library noise first)

__version__ = "0.1.0"
