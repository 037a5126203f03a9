"""The fedlora ClientApp: Flower glue around ``fedlora.node``."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import node, user_dp, wire
from .config import parse_run_config
from .logs import setup_logging
from .strategies import get_strategy

# Flower's fixedclipping_mod, for runs with user-dp.mode = client-fixed (a no-op otherwise).
app = ClientApp(mods=[user_dp.client_mod])

LEDGER_RECORD = "fedlora.privacy"  # key of the privacy ledger in the node's persistent state


def _task(msg: Message, context: Context) -> node.NodeTask:
    setup_logging()
    config = msg.content["config"]
    method = get_strategy(str(config[wire.STRATEGY_KEY]))
    run = parse_run_config(context.run_config)
    return node.NodeTask.open(run, dict(context.node_config), context.node_id, dict(config), method)


@app.train()
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
def evaluate(msg: Message, context: Context) -> Message:
    metrics = _task(msg, context).evaluate(msg.content["arrays"])
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
