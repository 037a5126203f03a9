"""The fedlora ServerApp: Flower glue around ``fedlora.experiment``."""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from .config import parse_run_config
from .experiment import Experiment
from .logs import setup_logging
from .simulation import skip_idle_nodes
from .strategies import FedLoraStrategy

app = ServerApp()
log = logging.getLogger("fedlora")


class TooFewNodes(RuntimeError):
    """Fewer than ``min-train-nodes`` nodes connected within ``node-wait-timeout``."""


def wait_for_nodes(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> int:
    """Wait until ``needed`` nodes are connected; return how many are. The
    federation's size is not configured: the server trains with whoever is
    connected once ``min-train-nodes`` are."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() >= deadline:
            raise TooFewNodes(
                f"{connected} node(s) connected within node-wait-timeout = {timeout:g} s, "
                f"fewer than min-train-nodes = {needed}: start more nodes, or lower min-train-nodes"
            )
        time.sleep(poll)
    return connected


def run_rounds(strategy: FedLoraStrategy, grid: Grid, exp: Experiment) -> None:
    """Flower's ``Strategy.start`` loop, from ``exp.start_round`` (a resumed run
    continues after its last checkpoint; round numbers seed the nodes'
    randomness, so they must be the true ones)."""
    run = exp.run
    strategy.summary()
    arrays = exp.initial_arrays
    if exp.start_round == 1:
        exp.evaluate_round(0, arrays)
    for server_round in range(exp.start_round, run.num_server_rounds + 1):
        replies = grid.send_and_receive(messages=strategy.configure_train(server_round, arrays, ConfigRecord(), grid), timeout=run.round_timeout)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        if messages:
            strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages=messages, timeout=run.round_timeout))
        exp.evaluate_round(server_round, arrays)  # also writes metrics and the checkpoint


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    if skip_idle_nodes(getattr(grid, "state", None)):  # a simulation's in-memory grid: Flower polls every node
        log.info("simulation: Flower's polling of idle nodes skips the message scan (FEDLORA_FLOWER_POLLING=1 leaves it as Flower's)")
    run = parse_run_config(context.run_config)
    exp = Experiment(run, run_id=context.run_id)
    nodes = wait_for_nodes(grid, run.min_train_nodes, run.node_wait_timeout)
    log.info("%d node(s) connected (min-train-nodes = %d)", nodes, run.min_train_nodes)
    run_rounds(exp.make_strategy(num_nodes=nodes), grid, exp)
    exp.finish()
