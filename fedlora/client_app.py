"""The fedlora ClientApp: Flower glue around ``fedlora.node``."""

from __future__ import annotations

import functools
import logging
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import node, node_errors, user_dp, wire
from .config import parse_run_config
from .logs import setup_logging
from .strategies import get_strategy

log = logging.getLogger("fedlora")

# Flower's fixedclipping_mod, for runs with user-dp.mode = client-fixed (a no-op otherwise).
app = ClientApp(mods=[user_dp.client_mod])

LEDGER_RECORD = "fedlora.privacy"  # key of the privacy ledger in the node's persistent state


def _refusals_carry_codes(handler):
    """The server gets a code, never the exception's text (it may quote private data);
    the details stay in this node's log."""

    @functools.wraps(handler)
    def handle(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as e:
            error = node_errors.classify(e)
            log.error("%s message refused: %s", msg.metadata.message_type, error.code, exc_info=e)
            raise error from None

    return handle


def _task(msg: Message, context: Context) -> node.NodeTask:
    setup_logging()
    config = msg.content["config"]
    method = get_strategy(str(config[wire.STRATEGY_KEY]))
    run = parse_run_config(context.run_config)
    return node.NodeTask.open(run, dict(context.node_config), context.node_id, dict(config), method)


@app.train()
@_refusals_carry_codes
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()  # the whole handling of the message, setup included
    task = _task(msg, context)
    saved = context.state.config_records.get(LEDGER_RECORD)
    arrays, metrics, ledger = task.train(msg.content["arrays"], str(saved["ledger"]) if saved else None)
    if ledger is not None:
        context.state[LEDGER_RECORD] = ConfigRecord({"ledger": ledger})
    metrics["client-seconds"] = time.perf_counter() - start
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
@_refusals_carry_codes
def evaluate(msg: Message, context: Context) -> Message:
    metrics = _task(msg, context).evaluate(msg.content["arrays"])
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
