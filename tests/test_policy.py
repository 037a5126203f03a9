"""The data owner's guarantee: a node with its own data applies its own privacy
policy (node config) to what a run asks, whatever the server sends. One test
per attack by a hostile server; each fails on a node that trusts the run config."""

import os
import stat
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedlora import client_app, node, node_errors, wire
from fedlora.config import parse_run_config
from fedlora.model import build_model

from conftest import make_rows, write_jsonl


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, server_task_identity):
    node._MODELS.clear()
    node._NODE_DATA.clear()


@pytest.fixture
def own_data(tmp_path):
    write_jsonl(tmp_path / "mine" / "train.jsonl", make_rows(60, seed=5))
    return str(tmp_path / "mine")


def _message(tiny_model_dir, task_dir, tmp_path, *, run_key="run-1", kind="train", **run_overrides):
    run_config = {
        "model": tiny_model_dir,
        "dataset": task_dir,
        "cache-dir": str(tmp_path / "server-chosen"),
        "local-steps": 2,
        "batch-size": 8,
        "num-server-rounds": 1,
        "dp.epsilon": 2.0,
        **run_overrides,
    }
    server_model = build_model(parse_run_config(run_config), 2, train_lora_a=False)
    config = ConfigRecord(
        {"strategy": "ffa-lora", "shared-fingerprint": wire.fingerprint(server_model), "label-names": ["0", "1"], "run-key": run_key, "server-round": 1}
    )
    msg = Message(RecordDict({"arrays": wire.to_arrays(server_model), "config": config}), dst_node_id=7, message_type=kind)
    return msg, run_config


def _context(run_config, node_config):
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def _refused(call, code, key=None):
    with pytest.raises(node_errors.NodeError) as e:
        call()
    assert e.value.code == code, str(e.value)
    if key is not None:
        assert e.value.key == key
    return str(e.value)


def test_a_non_private_run_is_refused_unless_the_node_allows_it(tiny_model_dir, task_dir, tmp_path, own_data):
    msg, rc = _message(tiny_model_dir, task_dir, tmp_path, **{"dp.epsilon": 0.0})
    state = str(tmp_path / "state")
    _refused(lambda: client_app.train(msg, _context(rc, {"data-path": own_data, "state-dir": state})), "E_POLICY", "dp.epsilon")
    reply = client_app.train(msg, _context(rc, {"data-path": own_data, "state-dir": state, "privacy.allow-non-private": True}))
    assert reply.content["metrics"]["epsilon"] == 0.0


def test_a_weak_budget_asked_by_the_server_is_refused(tiny_model_dir, task_dir, tmp_path, own_data):
    state = str(tmp_path / "state")
    msg, rc = _message(tiny_model_dir, task_dir, tmp_path, **{"dp.epsilon": 1e6})
    sent = _refused(lambda: client_app.train(msg, _context(rc, {"data-path": own_data, "state-dir": state})), "E_POLICY", "dp.epsilon")
    assert "1000000" not in sent  # the code and key only
    msg, rc = _message(tiny_model_dir, task_dir, tmp_path, **{"dp.epsilon": 2.0, "dp.delta": 0.1})
    _refused(lambda: client_app.train(msg, _context(rc, {"data-path": own_data, "state-dir": state})), "E_POLICY", "dp.delta")
    # The node's own cap decides, not the default: 2.0 > 1.5.
    msg, rc = _message(tiny_model_dir, task_dir, tmp_path, **{"dp.epsilon": 2.0})
    _refused(lambda: client_app.train(msg, _context(rc, {"data-path": own_data, "state-dir": state, "privacy.max-epsilon": 1.5})), "E_POLICY", "dp.epsilon")
    assert not os.path.exists(os.path.join(state, "ledgers"))  # refused before anything was spent


def test_the_node_decides_which_accountant_may_bound_its_epsilon(tiny_model_dir, task_dir, tmp_path, own_data):
    state = str(tmp_path / "state")
    msg, rc = _message(tiny_model_dir, task_dir, tmp_path, **{"dp.epsilon": 2.0, "dp.accountant": "prv"})
    _refused(
        lambda: client_app.train(msg, _context(rc, {"data-path": own_data, "state-dir": state, "privacy.accountants": "rdp"})), "E_POLICY", "dp.accountant"
    )
    assert not os.path.exists(os.path.join(state, "ledgers"))  # refused before anything was spent
    # No accountant at all is a broken policy, not one that refuses every run silently.
    _refused(lambda: client_app.train(msg, _context(rc, {"data-path": own_data, "state-dir": state, "privacy.accountants": "none"})), "E_NODE_CONFIG")
    reply = client_app.train(msg, _context(rc, {"data-path": own_data, "state-dir": state}))  # the default allows both
    assert 0 < reply.content["metrics"]["epsilon"] <= 2.0


def test_a_typo_in_a_policy_key_is_an_error_not_a_void_policy(tiny_model_dir, task_dir, tmp_path, own_data):
    msg, rc = _message(tiny_model_dir, task_dir, tmp_path, **{"dp.epsilon": 8.0})
    ctx = _context(rc, {"data-path": own_data, "state-dir": str(tmp_path / "state"), "privacy.max-epsilo": 3.0})
    sent = _refused(lambda: client_app.train(msg, ctx), "E_NODE_CONFIG")
    assert "max-epsilo" not in sent  # the node's own settings stay in its log


def test_a_model_outside_the_allowed_list_is_refused(tiny_model_dir, task_dir, tmp_path, own_data):
    msg, rc = _message(tiny_model_dir, task_dir, tmp_path)
    ctx = _context(rc, {"data-path": own_data, "state-dir": str(tmp_path / "state"), "privacy.allowed-models": "org/approved-model"})
    _refused(lambda: client_app.train(msg, ctx), "E_POLICY", "model")


def test_the_budget_is_per_data_source_across_runs(tiny_model_dir, task_dir, tmp_path, own_data):
    state = str(tmp_path / "state")
    node_config = {"data-path": own_data, "state-dir": state, "privacy.lifetime-epsilon": 2.2}
    first, rc = _message(tiny_model_dir, task_dir, tmp_path, run_key="run-1")
    assert 0 < client_app.train(first, _context(rc, node_config)).content["metrics"]["epsilon"] <= 2.0
    # A new run (a fresh run key from the server): the two plans compose (RDP) to epsilon 2.34 > 2.2: refused.
    second, rc = _message(tiny_model_dir, task_dir, tmp_path, run_key="run-2")
    _refused(lambda: client_app.train(second, _context(rc, node_config)), "E_POLICY", "dp.epsilon")
    # What was spent, per source, for the node's operator.
    out = subprocess.run([sys.executable, "-m", "fedlora.tools.cli", "budget", "--state-dir", state], capture_output=True, text=True, check=True).stdout
    assert os.path.realpath(own_data) in out and "1 run(s), 2 DP steps" in out and "RDP accountant" in out
    # The same history by PRV's tighter bound: a smaller epsilon, as the operator's other view.
    prv = subprocess.run(
        [sys.executable, "-m", "fedlora.tools.cli", "budget", "--state-dir", state, "--accountant", "prv"], capture_output=True, text=True, check=True
    ).stdout
    spent = [float(o.split("epsilon ")[2].split(" over")[0]) for o in (out, prv)]
    assert "PRV accountant" in prv and 0 < spent[1] < spent[0]


def test_client_evaluation_is_off_by_default_and_capped_when_on(tiny_model_dir, task_dir, tmp_path, own_data):
    state = str(tmp_path / "state")
    msg, rc = _message(tiny_model_dir, task_dir, tmp_path, kind="evaluate", **{"fraction-evaluate": 1.0})
    _refused(lambda: client_app.evaluate(msg, _context(rc, {"data-path": own_data, "state-dir": state})), "E_POLICY", "fraction-evaluate")
    ctx = _context(rc, {"data-path": own_data, "state-dir": state, "privacy.allow-client-eval": True, "privacy.max-eval-queries": 2})
    for _ in range(2):
        assert 0 <= client_app.evaluate(msg, ctx).content["metrics"]["accuracy"] <= 1
    _refused(lambda: client_app.evaluate(msg, ctx), "E_POLICY", "fraction-evaluate")  # a flood of queries stops at the cap


def test_the_server_cannot_choose_where_a_node_keeps_its_state(tiny_model_dir, task_dir, tmp_path, own_data):
    msg, rc = _message(tiny_model_dir, task_dir, tmp_path)
    state = tmp_path / "state"
    client_app.train(msg, _context(rc, {"data-path": own_data, "state-dir": str(state)}))
    assert not (tmp_path / "server-chosen").exists()  # the run's cache-dir is ignored by a node with its own data
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    written = [os.path.join(d, f) for d, _, files in os.walk(state) for f in files if not f.endswith(".lock")]
    assert any("tokens" in p for p in written) and any("ledgers" in p for p in written)
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in written), written
