"""One logger, ``fedlora``, printing readable lines next to Flower's."""

import logging
import sys

_FORMAT = "%(levelname)s %(asctime)s fedlora: %(message)s"


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    log = logging.getLogger("fedlora")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False
    return log
