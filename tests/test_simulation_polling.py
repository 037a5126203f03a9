"""fedlora.simulation's stand-in for Flower's simulation loop (``pending_nodes_loop``),
and the ServerApp's shortcut for idle nodes in Flower's own loop (``skip_idle_nodes``,
for ``flwr run``): on Flower's own in-memory LinkState each must deliver what Flower's
loop delivers, in the same order, while scanning the messages only for the nodes that
have one waiting."""

from __future__ import annotations

import inspect
import os
import queue
import threading
import time

import pytest

pytest.importorskip("flwr")

from flwr.app import Message, RecordDict  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.proto.task_pb2 import Task  # noqa: E402
from flwr.server.superlink.fleet.vce import vce_api  # noqa: E402
from flwr.server.superlink.linkstate import LinkStateFactory  # noqa: E402
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord  # noqa: E402
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID  # noqa: E402
from flwr.supercore.object_store import ObjectStoreFactory  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.superlink.federation import NoOpFederationManager  # noqa: E402
from flwr.superlink.grid import InMemoryGrid  # noqa: E402

from fedlora.simulation import FLOWER_POLLING_ENV, lean_polling, pending_nodes_loop, skip_idle_nodes  # noqa: E402

RUN_ID, TASK_ID = 7, 8


def _federation(nodes: int, receivers: list[int]):
    """A simulation's LinkState with ``nodes`` registered nodes, one message stored for
    each entry of ``receivers`` (indices into the nodes) as the ServerApp's grid stores it."""
    state, mapping, _ = _federation_and_grid(nodes, receivers)
    return state, mapping


def _federation_and_grid(nodes: int, receivers: list[int]):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = TASK_ID, RUN_ID, SUPERLINK_NODE_ID
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = vce_api._register_nodes(nodes, factory)
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    ids = list(mapping)
    stored = list(grid.push_messages([Message(RecordDict(), dst_node_id=ids[i], message_type="train") for i in receivers]))
    assert len(stored) == len(receivers) == state.num_message_ins()
    return state, mapping, grid


def _questions(state, mapping) -> list[int]:
    """Record, in order, the partitions that ``state.get_message_ins`` as it is now is
    asked about from now on (wrapped again later, it records what reaches it)."""
    asked: list[int] = []
    get = state.get_message_ins

    def spy(node_id, limit, **kw):
        asked.append(mapping[node_id])
        return get(node_id=node_id, limit=limit, **kw)

    state.get_message_ins = spy
    return asked


def _run_loop(loop, state, mapping, seconds: float = 0.45):
    """Run ``loop`` for ``seconds`` (four passes or so); return the partitions whose
    messages it queued, in queue order, and the partitions it asked the state about."""
    asked = _questions(state, mapping)
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=loop, args=(state, out, mapping, stop))
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    delivered = []
    while not out.empty():
        delivered.append(mapping[out.get().metadata.dst_node_id])
    return delivered, asked


def test_the_loop_delivers_what_flowers_delivers_and_asks_only_waiting_nodes():
    receivers = [3, 17, 17, 40]  # partition 17 has two messages: one a pass, as Flower does
    flower, flower_asked = _run_loop(vce_api.add_messages_to_queue, *_federation(50, receivers))
    lean, lean_asked = _run_loop(pending_nodes_loop(vce_api.add_messages_to_queue), *_federation(50, receivers))
    assert flower == lean == [3, 17, 40, 17]
    assert len(flower_asked) >= 2 * 50  # every node, every pass
    assert lean_asked == [3, 17, 40, 17]  # each node only while it had a message waiting


def test_a_state_without_the_in_memory_store_gets_flowers_loop():
    calls = []

    def flower_loop(*args):
        calls.append(args)

    state = object()
    pending_nodes_loop(flower_loop)(state, "q", {1: 0}, "stop")
    assert calls == [(state, "q", {1: 0}, "stop")]


def test_lean_polling_swaps_flowers_loop_in_and_back():
    flower_loop = vce_api.add_messages_to_queue
    # The stand-in takes over Flower's function by name: its signature must still match.
    assert list(inspect.signature(flower_loop).parameters) == ["state", "queue", "nodes_mapping", "f_stop"]
    with lean_polling():
        assert vce_api.add_messages_to_queue is not flower_loop
    assert vce_api.add_messages_to_queue is flower_loop
    with lean_polling(False):
        assert vce_api.add_messages_to_queue is flower_loop
    with pytest.raises(RuntimeError), lean_polling():
        raise RuntimeError("the simulation failed")
    assert vce_api.add_messages_to_queue is flower_loop


def test_flowers_loop_over_a_state_that_skips_idle_nodes_delivers_the_same():
    receivers = [3, 17, 17, 40]
    state, mapping = _federation(50, receivers)
    scanned = _questions(state, mapping)  # what reaches Flower's scan
    assert skip_idle_nodes(state)
    delivered, asked = _run_loop(vce_api.add_messages_to_queue, state, mapping)
    assert delivered == [3, 17, 40, 17]  # what Flower's loop alone delivers (the test above)
    assert len(asked) >= 2 * 50  # Flower's loop still asks about every node, every pass ...
    assert set(scanned) == {3, 17, 40}  # ... but only nodes with a message waiting cost a scan
    assert len(scanned) < 10


def test_a_message_stored_after_the_shortcut_is_delivered_in_the_next_pass():
    state, mapping, grid = _federation_and_grid(20, [])
    scanned = _questions(state, mapping)  # what reaches Flower's scan
    assert skip_idle_nodes(state, refresh=3600.0)  # never rescans: the stored message alone must add its node
    assert state.get_message_ins(node_id=next(iter(mapping)), limit=1) == []  # builds the (empty) waiting set
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, out, mapping, stop))
    thread.start()
    time.sleep(0.15)
    node = list(mapping)[11]
    assert len(list(grid.push_messages([Message(RecordDict(), dst_node_id=node, message_type="train")]))) == 1
    time.sleep(0.3)
    stop.set()
    thread.join(timeout=5)
    assert [out.get().metadata.dst_node_id for _ in range(out.qsize())] == [node]
    assert scanned and set(scanned) == {11}


def test_the_shortcut_is_off_where_flowers_polling_is_asked_for_or_the_state_is_another(monkeypatch):
    state, _ = _federation(5, [1])
    monkeypatch.setenv(FLOWER_POLLING_ENV, "1")
    get = state.get_message_ins
    assert not skip_idle_nodes(state)
    assert state.get_message_ins == get
    monkeypatch.delenv(FLOWER_POLLING_ENV)
    assert not skip_idle_nodes(object()) and not skip_idle_nodes(None)
    assert skip_idle_nodes(state) and not skip_idle_nodes(state)  # installed once


def test_lean_polling_off_keeps_the_servers_shortcut_off_within_the_block(monkeypatch):
    monkeypatch.delenv(FLOWER_POLLING_ENV, raising=False)
    with lean_polling(False):
        assert os.environ.get(FLOWER_POLLING_ENV)
    assert FLOWER_POLLING_ENV not in os.environ
    with lean_polling():
        assert FLOWER_POLLING_ENV not in os.environ
