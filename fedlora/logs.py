"""One logger, ``fedlora``, printing readable lines next to Flower's."""

import logging
import sys
import warnings

_FORMAT = "%(levelname)s %(asctime)s fedlora: %(message)s"

# Library notices that say nothing about the run, printed by every process of
# every run (a first run's output should be readable). Silenced by exact message.
_NOISE = (
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated"),  # transformers 5, from PEFT's model wrapper
    (FutureWarning, r"Tip: In future versions of Ray, Ray will no longer override accelerator"),  # Ray, num_gpus=0
)
for _category, _message in _NOISE:
    warnings.filterwarnings("ignore", message=_message, category=_category)


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    # Flower's logger has its own console handler; inside a Ray actor its records also
    # reached the root logger Ray configures, so every Flower line was printed twice
    # (once plain, once with a date prefix).
    flwr_log = logging.getLogger("flwr")
    if flwr_log.handlers:
        flwr_log.propagate = False
    log = logging.getLogger("fedlora")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False
    return log
