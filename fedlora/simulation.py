"""Run the app as an in-process Flower simulation with a run config.

``flwr run .`` is the way to run the app; this is for tests, benchmarks and
scripts that need many runs from Python. Flower's public
``flwr.simulation.run_simulation`` passes an empty run config, so this uses
its internal entry point, which takes one (pinned to the flwr minor version in
pyproject). The app directory handed to Flower is a temporary one whose
``pyproject.toml`` holds ``config.DEFAULTS`` plus the overrides.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import DEFAULTS, parse_run_config

# A simulation option next to the run config (grid files and ``simulate``'s
# overrides may set it): the number of simulated nodes. Named as in Flower's
# node config, where each node reads it with its ``partition-id``.
NODES_KEY = "num-partitions"
DEFAULT_NODES = 3


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_pyproject(directory: str, name: str, components: tuple[str, str], config: dict[str, Any]) -> None:
    """An app directory's pyproject.toml: Flower reads the components and the run config from it."""
    lines = [
        "[project]",
        f'name = "{name}"',
        'version = "0.0.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "fedlora"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{components[0]}"',
        f'clientapp = "{components[1]}"',
        "",
        "[tool.flwr.app.config]",
    ] + [f'"{k}" = {_toml_value(v)}' for k, v in config.items()]
    Path(directory, "pyproject.toml").write_text("\n".join(lines) + "\n")


def write_app_dir(overrides: dict[str, Any], directory: str) -> dict[str, Any]:
    config = {**DEFAULTS, **overrides}
    parse_run_config(config)  # fail here, with the key named, not inside Ray
    write_pyproject(directory, "fedlora-sim", ("fedlora.server_app:app", "fedlora.client_app:app"), config)
    return config


# Set (to anything) to keep Flower's polling as it is, in ``flwr run`` simulations as in
# ``simulate`` (benchmarks/scale.py's side-by-side of the two loops).
FLOWER_POLLING_ENV = "FEDLORA_FLOWER_POLLING"


def _waiting_nodes(state: Any) -> set[int]:
    """The nodes with an undelivered message in an in-memory LinkState (one pass over its store)."""
    with state.lock:
        return {m.metadata.dst_node_id for m in state.message_ins_store.values() if m.metadata.delivered_at == ""}


def _has_in_memory_store(state: Any) -> bool:
    return isinstance(getattr(state, "message_ins_store", None), dict) and getattr(state, "lock", None) is not None


def skip_idle_nodes(state: Any, refresh: float = 0.05) -> bool:
    """Make an in-memory LinkState's ``get_message_ins`` answer ``[]`` at once for a node
    with no message waiting; True if installed.

    ``flwr run``'s simulation runs Flower's own loop (``vce_api.add_messages_to_queue``),
    started before the ServerApp, so ``pending_nodes_loop`` cannot replace it there; the
    ServerApp can still reach the LinkState that loop polls (the in-memory grid's
    ``state``). Every 0.1 s the loop asks it about every node, and each question scans
    every stored message; with this, a question about an idle node costs a set lookup.
    The waiting set is rebuilt by one scan at most every ``refresh`` seconds, and a
    stored message adds its node at once, so no message waits longer than it would with
    Flower's scan. Does nothing (False) for another kind of state, or where
    ``FEDLORA_FLOWER_POLLING`` is set."""
    if os.environ.get(FLOWER_POLLING_ENV) or not _has_in_memory_store(state) or getattr(state, "_fedlora_skips_idle", False):
        return False
    ask, store = state.get_message_ins, state.store_message_ins
    guard, seen = threading.Lock(), {"at": -math.inf, "nodes": set()}

    def get_message_ins(node_id: int, limit: int | None, *, run_id: int | None = None) -> list:
        with guard:
            if time.monotonic() - seen["at"] >= refresh:
                # Scanned under ``guard``, so a message stored meanwhile is added after this set replaces the old one.
                seen["nodes"], seen["at"] = _waiting_nodes(state), time.monotonic()
            idle = node_id not in seen["nodes"]
        return [] if idle else ask(node_id=node_id, limit=limit, run_id=run_id)

    def store_message_ins(message: Any) -> Any:
        message_id = store(message)
        if message_id is not None:
            with guard:
                seen["nodes"].add(message.metadata.dst_node_id)
        return message_id

    state.get_message_ins, state.store_message_ins = get_message_ins, store_message_ins
    state._fedlora_skips_idle = True
    return True


def pending_nodes_loop(flower_loop: Callable[..., None]) -> Callable[..., None]:
    """A stand-in for Flower's ``vce_api.add_messages_to_queue`` (``flower_loop``) that
    asks the LinkState only for the nodes with an undelivered message.

    Flower's loop calls ``state.get_message_ins`` for every node every 0.1 s, and each
    call scans every stored message: at 1,000 nodes that is ~0.6 of a CPU all the time,
    taken from the actors that train (docs/BENCHMARKS.md, ``benchmarks/scale.py``). This
    one reads which nodes have a message waiting (one pass over the stored messages,
    under the state's lock) and asks for those, in Flower's node order, one message each
    per pass as Flower does. A LinkState without the in-memory store it reads gets
    Flower's own loop.
    """

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: dict[int, int], f_stop: Any) -> None:
        if not _has_in_memory_store(state):
            flower_loop(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            if waiting := _waiting_nodes(state):
                for node_id in [n for n in nodes_mapping if n in waiting]:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
            f_stop.wait(0.1)

    return add_messages_to_queue


@contextlib.contextmanager
def lean_polling(enabled: bool = True) -> Iterator[None]:
    """Within the block, Flower's simulation loop asks only for the nodes with a message
    waiting (``pending_nodes_loop``); Flower's own loop is back afterwards. ``enabled =
    False`` keeps Flower's polling whole: its loop, and a LinkState the ServerApp leaves
    as it is (``FEDLORA_FLOWER_POLLING`` set within the block, see ``skip_idle_nodes``)."""
    from flwr.server.superlink.fleet.vce import vce_api

    flower_loop, env = vce_api.add_messages_to_queue, os.environ.get(FLOWER_POLLING_ENV)
    if enabled:
        vce_api.add_messages_to_queue = pending_nodes_loop(flower_loop)
    else:
        os.environ[FLOWER_POLLING_ENV] = "1"
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = flower_loop
        if env is None:
            os.environ.pop(FLOWER_POLLING_ENV, None)
        else:
            os.environ[FLOWER_POLLING_ENV] = env


def run_apps(
    server_app,
    client_app,
    num_supernodes: int,
    app_dir: str,
    cpus_per_client: int = 2,
    fab_id: str = "fedlora/fedlora",
    flower_polling: bool = False,
) -> None:
    """Run ``server_app`` and ``client_app`` as an in-process Flower simulation of
    ``num_supernodes`` nodes; every context's run config is read from ``app_dir``'s
    pyproject. Used by ``simulate`` and by ``benchmarks/scale.py`` (for a trivial app).
    ``flower_polling`` keeps Flower's loop, which asks every node for messages every
    0.1 s, instead of ``pending_nodes_loop`` (for the benchmark's side-by-side)."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    run_id = int.from_bytes(os.urandom(6), "little")
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = run_id + 1
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = {}
    run.fab_id, run.fab_version = fab_id, "0.0.0"
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    server_context = Context(
        run_id=run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(Path(app_dir), {}),
    )
    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": min(cpus_per_client, cpus), "num_gpus": 0.0},
        # No Ray dashboard: it costs CPU at every start and nothing here reads it.
        "init_args": {"num_cpus": cpus, "log_to_driver": True, "include_dashboard": False},
    }
    with lean_polling(not flower_polling):
        _run_simulation(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_config=backend,
            server_app_context=server_context,
            app_dir=app_dir,
            run=run,
            is_app=True,
        )


def simulate(overrides: dict[str, Any] | None = None, num_supernodes: int | None = None, cpus_per_client: int = 2, flower_polling: bool = False) -> None:
    """Run one simulation in this process; raises what the ServerApp raises.

    ``overrides`` is a run config, plus optionally ``num-partitions``: the number
    of simulated nodes (default 3) when ``num_supernodes`` is not given; ``flower_polling``
    as in ``run_apps``."""
    from .client_app import app as client_app
    from .server_app import app as server_app

    overrides = dict(overrides or {})
    # Not a run-config key: how many simulated nodes (Flower gives each its partition-id / num-partitions).
    nodes = overrides.pop(NODES_KEY, DEFAULT_NODES)
    with tempfile.TemporaryDirectory(prefix="fedlora-app-") as app_dir:
        write_app_dir(overrides, app_dir)
        run_apps(server_app, client_app, num_supernodes or int(nodes), app_dir, cpus_per_client, flower_polling=flower_polling)


def main(argv: list[str] | None = None) -> None:
    """``python -m fedlora.simulation --overrides '{"key": value}'``: one run (used by ``fedlora compare``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedlora.simulation")
    parser.add_argument("--overrides", default="{}", help="run-config overrides as a JSON object")
    args = parser.parse_args(argv)
    simulate(json.loads(args.overrides))


if __name__ == "__main__":
    main()
