"""fedlora: federated LoRA and FFA-LoRA fine-tuning under differential privacy, on Flower."""

__version__ = "0.1.0"
