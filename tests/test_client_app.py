"""The ClientApp's Flower glue, called directly with a hand-built Message and Context."""

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora import client_app, node, node_errors, wire
from fedlora.config import parse_run_config
from fedlora.model import build_model

pytestmark = pytest.mark.usefixtures("server_task_identity")  # Flower messages outside a SuperLink


@pytest.fixture
def node_log(caplog):
    """The node's own log (the fedlora logger does not propagate to the root)."""
    import logging

    logger = logging.getLogger("fedlora")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _setup(tiny_model_dir, task_dir, tmp_path, fingerprint=None):
    run_config = {
        "model": tiny_model_dir,
        "dataset": task_dir,
        "cache-dir": str(tmp_path),
        "local-steps": 2,
        "batch-size": 8,
        "num-server-rounds": 1,
        "dp.epsilon": 2.0,
    }
    server_model = build_model(parse_run_config(run_config), 2, train_lora_a=False)
    config = ConfigRecord(
        {
            "strategy": "ffa-lora",
            "shared-fingerprint": fingerprint or wire.fingerprint(server_model),
            "label-names": ["0", "1"],
            "run-key": "run-1",
            "server-round": 1,
        }
    )
    msg = Message(RecordDict({"arrays": wire.to_arrays(server_model), "config": config}), dst_node_id=7, message_type="train")
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config=run_config)
    return msg, ctx


def test_train_replies_with_b_only_and_persists_the_ledger(tiny_model_dir, task_dir, tmp_path):
    msg, ctx = _setup(tiny_model_dir, task_dir, tmp_path)
    reply = client_app.train(msg, ctx)
    arrays = reply.content["arrays"]
    keys = list(arrays.keys())
    assert any(".lora_B." in k for k in keys) and not any(".lora_A." in k for k in keys)
    assert set(keys) == set(msg.content["arrays"].keys())  # B and the (trained) head, as sent
    metrics = reply.content["metrics"]
    assert 0 < metrics["epsilon"] <= 2.0 and metrics["num-examples"] > 0 and "train-loss" not in metrics
    assert client_app.LEDGER_RECORD in ctx.state.config_records
    assert list((tmp_path / "ledgers").glob("*.json"))
    ledger = (next((tmp_path / "ledgers").glob("*.json"))).read_text()
    # The same round again (a resumed run repeating an interrupted round): the same
    # update is sent again, nothing is trained or spent.
    again = client_app.train(msg, ctx)
    for k in keys:
        assert (again.content["arrays"][k].numpy() == arrays[k].numpy()).all()
    assert again.content["metrics"]["epsilon"] == metrics["epsilon"]
    assert (next((tmp_path / "ledgers").glob("*.json"))).read_text() == ledger
    # A different global model for that round is trained, and the planned budget is spent: refused.
    msg.content["arrays"][keys[0]] = type(arrays[keys[0]])(arrays[keys[0]].numpy() + 1.0)
    with pytest.raises(Exception, match="privacy budget exhausted"):
        client_app.train(msg, ctx)
    # So is the next round.
    msg2 = Message(
        RecordDict({"arrays": reply.content["arrays"], "config": ConfigRecord({**dict(msg.content["config"]), "server-round": 2})}),
        dst_node_id=7,
        message_type="train",
    )
    with pytest.raises(Exception, match="privacy budget exhausted"):
        client_app.train(msg2, ctx)


def test_train_refuses_on_a_foreign_shared_init(tiny_model_dir, task_dir, tmp_path, node_log):
    msg, ctx = _setup(tiny_model_dir, task_dir, tmp_path, fingerprint="0" * 64)
    with pytest.raises(node_errors.NodeError, match="E_FINGERPRINT"):
        client_app.train(msg, ctx)
    assert any(
        isinstance(r.exc_info[1], node.FingerprintMismatch) and "refusing to train" in str(r.exc_info[1]) for r in node_log.records if r.exc_info
    )  # the details stay in the node's log


def test_an_error_sent_to_the_server_carries_a_code_not_the_nodes_data(tiny_model_dir, task_dir, tmp_path, node_log):
    from conftest import write_jsonl

    msg, ctx = _setup(tiny_model_dir, task_dir, tmp_path)
    write_jsonl(tmp_path / "private" / "train.jsonl", [{"text": "patient notes", "label": "HIV-positive"}] * 4)
    ctx.node_config = {"data-path": str(tmp_path / "private")}
    with pytest.raises(node_errors.NodeError) as e:
        client_app.train(msg, ctx)
    sent = str(e.value)  # what Flower forwards to the server
    assert sent.startswith("fedlora node error E_CONFIG (key 'label-column')")
    assert "HIV" not in sent and "patient" not in sent and str(tmp_path) not in sent
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained exception text either
    assert "HIV-positive" in node_log.text  # the node's own log has the details


def test_a_forged_ledger_is_refused_not_trusted(tiny_model_dir, task_dir, tmp_path):
    import json

    from fedlora.node_store import NodeStore
    from fedlora.privacy import PrivacyLedger

    msg, ctx = _setup(tiny_model_dir, task_dir, tmp_path)
    store = NodeStore(str(tmp_path), "run-1", "0")  # this node's store for the run (partition 0)
    forged = {"target_epsilon": 1e9, "delta": 1e-5, "noise_multiplier": 0.001, "sample_rate": 0.02, "planned_steps": 10**6, "history": [], "accountant": "rdp"}
    store.save_ledger(PrivacyLedger(**forged))
    with pytest.raises(node_errors.NodeError, match="E_LEDGER"):
        client_app.train(msg, ctx)
    assert json.loads(open(store.ledger_path).read()) == forged  # left as it was, for the operator to inspect


def test_the_ledger_is_charged_before_training(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    from fedlora import training
    from fedlora.node_store import NodeStore

    msg, ctx = _setup(tiny_model_dir, task_dir, tmp_path)

    def crash(*args, **kwargs):  # the process dies mid-training
        raise RuntimeError("killed")

    monkeypatch.setattr(training, "train", crash)
    with pytest.raises(node_errors.NodeError, match="E_INTERNAL"):
        client_app.train(msg, ctx)
    ledger = NodeStore(str(tmp_path), "run-1", "0").load_ledger()
    assert ledger is not None and ledger.steps_spent == 2  # local-steps, recorded before training started
    monkeypatch.undo()
    with pytest.raises(node_errors.NodeError, match="E_BUDGET"):  # the plan (1 round x 2 steps) is spent
        client_app.train(msg, ctx)


def test_the_ledger_lock_serialises_two_writers(tmp_path):
    import threading
    import time

    from fedlora.node_store import NodeStore

    store, order = NodeStore(str(tmp_path), "run", "node"), []

    def second():
        with store.ledger_lock():
            order.append("second")

    with store.ledger_lock():
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first")
    t.join(5)
    assert order == ["first", "second"]
