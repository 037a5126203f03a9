"""The fedlora ClientApp: Flower glue around ``fedlora.node``."""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import node, user_dp, wire
from .config import parse_run_config
from .logs import setup_logging
from .strategies import get_strategy
from .strategies.base import FINGERPRINT_KEY, STRATEGY_KEY

log = logging.getLogger("fedlora")
# Flower's fixedclipping_mod, for runs with user-dp.mode = client-fixed (a no-op otherwise).
app = ClientApp(mods=[user_dp.client_mod])

LEDGER_RECORD = "fedlora.privacy"  # key of the privacy ledger in the node's persistent state


def _runtime(msg: Message, context: Context) -> tuple[node.NodeRuntime, ConfigRecord, wire.Exchange]:
    setup_logging()
    run = parse_run_config(context.run_config)
    config = msg.content["config"]
    method = get_strategy(str(config[STRATEGY_KEY]))
    rt = node.get_runtime(run, dict(context.node_config), tuple(config["label-names"]), method.train_lora_a, method.mixed_ranks)
    node.check_fingerprint(rt, str(config[FINGERPRINT_KEY]), method.exchange)
    return rt, config, method.exchange


def _node_key(context: Context) -> str:
    """This node's identity across restarts: keys its ledger and personal state."""
    return str(context.node_config.get("partition-id", context.node_config.get("data-path", context.node_id)))


def _personal_dir(rt: node.NodeRuntime, config: ConfigRecord, context: Context, ex: wire.Exchange) -> str | None:
    return node.personal_dir(rt, str(config["run-key"]), _node_key(context)) if wire.personal_names(rt.model, ex) else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()  # the whole handling of the message, setup included
    rt, config, ex = _runtime(msg, context)
    server_round = int(config["server-round"])
    # A repeated round (a resumed run) gets the update this node already sent, not a new one.
    rpath = node.reply_path(rt, str(config["run-key"]), _node_key(context))
    digest = node.arrays_digest(msg.content["arrays"])
    cached = node.load_reply(rpath, server_round, digest)
    if cached is not None:
        log.info("round %d: sending again the update already sent for this round (no new training, no new privacy cost)", server_round)
        arrays, metrics = cached
        metrics["client-seconds"] = time.perf_counter() - start
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)
    ledger = None
    if rt.run.dp.enabled:
        # Keyed by the run (survives a resumed run) and this node's identity.
        path = node.ledger_path(rt, str(config["run-key"]), _node_key(context))
        record = context.state.config_records.get(LEDGER_RECORD)
        ledger = node.load_ledger(path, str(record["ledger"]) if record else None) or node.plan_ledger(rt)
    pdir = _personal_dir(rt, config, context, ex)
    arrays, metrics = node.train_round(
        rt, msg.content["arrays"], server_round, ledger,
        progress_prefix=f"[node {context.node_config.get('partition-id', context.node_id)} round {server_round}] ",
        exchange=ex, personal=node.load_personal(pdir, server_round - 1) if pdir else None,
    )
    if pdir:
        node.save_personal(pdir, server_round, wire.to_arrays(rt.model, wire.personal_names(rt.model, ex)))
    if ledger is not None:
        node.save_ledger(path, ledger)
        context.state[LEDGER_RECORD] = ConfigRecord({"ledger": ledger.to_json()})
        metrics["noise-multiplier"] = ledger.noise_multiplier
    # After the ledger: a crash in between re-trains (refused by the ledger), never replays unaccounted steps.
    node.save_reply(rpath, server_round, digest, arrays, metrics)
    metrics["client-seconds"] = time.perf_counter() - start
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    rt, config, ex = _runtime(msg, context)
    pdir = _personal_dir(rt, config, context, ex)
    personal = node.load_personal(pdir, int(config["server-round"])) if pdir else None
    metrics = node.evaluate_round(rt, msg.content["arrays"], exchange=ex, personal=personal)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

