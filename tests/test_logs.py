"""What a run prints is readable: Flower's lines once, known library noise silenced."""

import logging
import warnings

from fedlora.logs import setup_logging


def test_flower_lines_are_not_printed_again_by_the_root_logger():
    import io

    from flwr.common.logger import console_handler  # Flower's own console handler

    flwr_log, root = logging.getLogger("flwr"), logging.getLogger()
    flwr_out, root_out = io.StringIO(), io.StringIO()
    # Only Flower's handler: other tests' capture handlers may be attached to the flwr logger too.
    consoles = [h for h in flwr_log.handlers if h is console_handler]
    streams = [h.setStream(flwr_out) for h in consoles]
    handler = logging.StreamHandler(root_out)  # what Ray sets up in its actors: a root handler with a date format
    handler.setFormatter(logging.Formatter("%(asctime)s:%(levelname)s:%(message)s"))
    root.addHandler(handler)
    try:
        setup_logging()
        flwr_log.warning("Manually terminating ClientAppActor")
    finally:
        root.removeHandler(handler)
        for h, stream in zip(consoles, streams):
            h.setStream(stream)
    assert consoles and flwr_out.getvalue().count("Manually terminating ClientAppActor") == 1
    assert "Manually terminating" not in root_out.getvalue()  # not a second time, with a date prefix


def test_the_noise_filters_match_the_library_messages():
    import fedlora  # noqa: F401  (installs the filters)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import fedlora.logs as logs  # the filters are re-applied here, after simplefilter reset them

        for category, message in logs._NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
