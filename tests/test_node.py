"""A client node without Flower: its data, its caches, its privacy budget."""

import numpy as np
import pytest
import torch

from fedlora import data as data_mod
from fedlora import node, privacy, wire
from fedlora.config import ConfigError, parse_run_config
from fedlora.privacy import BudgetExhausted

from conftest import make_rows, write_jsonl


@pytest.fixture
def run(tiny_model_dir, task_dir, tmp_path):
    node._MODELS.clear()
    node._NODE_DATA.clear()
    return parse_run_config(
        {
            "model": tiny_model_dir,
            "dataset": task_dir,
            "cache-dir": str(tmp_path / "cache"),
            "local-steps": 3,
            "batch-size": 8,
            "num-server-rounds": 2,
            "dp.epsilon": 2.0,
        }
    )


LABELS = ("0", "1")


def test_deployed_node_uses_its_own_data_whole(run, tmp_path):
    path = write_jsonl(tmp_path / "mine" / "train.jsonl", make_rows(37, seed=5))
    rt = node.get_runtime(run, {"data-path": str(tmp_path / "mine")}, LABELS, train_lora_a=False)
    assert rt.num_examples == 37 and rt.private  # private data: DP noise is not seeded
    assert path


def test_node_needs_a_partition_or_data_path(run):
    with pytest.raises(ConfigError) as e:
        node.get_runtime(run, {}, LABELS, train_lora_a=False)
    assert e.value.key == "node-config"


def test_a_simulated_node_takes_its_partition_count_from_its_node_config(run):
    # The run config has no node count: each node's partition is partition-id of its own num-partitions.
    sizes = [node.get_runtime(run, {"partition-id": i, "num-partitions": 4}, LABELS, train_lora_a=False).num_examples for i in range(4)]
    assert sum(sizes) == 600 and max(sizes) - min(sizes) <= 1  # the task's 600 examples, IID in 4
    with pytest.raises(ConfigError, match="num-partitions") as e:
        node.get_runtime(run, {"partition-id": 0}, LABELS, train_lora_a=False)
    assert e.value.key == "node-config"


def test_client_ranks_without_an_entry_for_this_node_are_refused(run):
    import dataclasses

    ranked = dataclasses.replace(run, lora=dataclasses.replace(run.lora, client_ranks=(8, 4)))
    assert node.node_rank(ranked, {"partition-id": 1, "num-partitions": 3}) == 4
    with pytest.raises(ConfigError, match="none for partition-id 2") as e:
        node.node_rank(ranked, {"partition-id": 2, "num-partitions": 3})
    assert e.value.key == "lora.client-ranks"


def test_node_data_with_a_label_outside_the_run_label_set_is_refused(run, tmp_path):
    write_jsonl(tmp_path / "odd" / "train.jsonl", [{"text": "x", "label": 5}])
    with pytest.raises(ConfigError, match="outside the label set"):
        node.get_runtime(run, {"data-path": str(tmp_path / "odd")}, LABELS, train_lora_a=False)


def test_runtime_is_built_once_per_process_and_tokens_cached_on_disk(run, monkeypatch):
    cfg = {"partition-id": 1, "num-partitions": 3}
    first = node.get_runtime(run, cfg, LABELS, train_lora_a=False)
    again = node.get_runtime(run, cfg, LABELS, train_lora_a=False)
    assert again.model is first.model and again.train_data is first.train_data
    other = node.get_runtime(run, {"partition-id": 2, "num-partitions": 3}, LABELS, train_lora_a=False)
    assert other.model is first.model and len(other.train_data) != 0  # the model is shared, data is per node
    # A fresh process (memory caches gone) reads the tokens from disk instead of tokenising again.
    node._NODE_DATA.clear()
    monkeypatch.setattr(data_mod, "_encode", lambda *a, **k: pytest.fail("re-tokenised despite the disk cache"))
    fresh = node.get_runtime(run, cfg, LABELS, train_lora_a=False)
    assert torch.equal(fresh.train_data.tensors["input_ids"], first.train_data.tensors["input_ids"])


def test_a_node_never_trains_past_its_budget(run):
    rt = node.get_runtime(run, {"partition-id": 0, "num-partitions": 3}, LABELS, train_lora_a=False)
    ledger = node.plan_ledger(rt)
    assert ledger.planned_steps == 2 * 3
    arrays = wire.to_arrays(rt.model)
    eps = []
    for rnd in (1, 2):
        arrays, metrics = node.train_round(rt, arrays, rnd, ledger)
        eps.append(metrics["epsilon"])
    assert 0 < eps[0] < eps[1] <= 2.0
    before = ledger.to_json()
    with pytest.raises(BudgetExhausted):
        node.train_round(rt, arrays, 3, ledger)
    assert ledger.to_json() == before  # nothing spent by the refused round


def test_a_stored_ledger_of_another_accountant_is_refused():
    # Same target, noise and schedule: only the accountant differs, and with it what
    # epsilon the stored history is worth.
    planned = privacy.PrivacyLedger(3.0, 1e-5, noise_multiplier=0.9, sample_rate=0.02, planned_steps=40, accountant="prv")
    stored = privacy.PrivacyLedger.from_json(planned.to_json())
    stored.record(4)
    node.check_ledger(stored, planned)  # the run's own ledger, after a round
    stored.accountant = "rdp"
    with pytest.raises(node.LedgerMismatch, match="accountant"):
        node.check_ledger(stored, planned)


@pytest.mark.slow  # trains four rounds
def test_simulation_rounds_are_reproducible_and_deployed_nodes_are_not(run, tmp_path):
    import numpy as np

    sim = node.get_runtime(run, {"partition-id": 0, "num-partitions": 3}, LABELS, train_lora_a=False)
    start = wire.to_arrays(sim.model)
    results = []
    for _ in range(2):
        arrays, _ = node.train_round(sim, start, 1, node.plan_ledger(sim))
        results.append({k: v.numpy().copy() for k, v in arrays.items()})
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])  # seeded: (seed, round, partition)

    write_jsonl(tmp_path / "mine" / "train.jsonl", make_rows(40, seed=5))
    dep = node.get_runtime(run, {"data-path": str(tmp_path / "mine")}, LABELS, train_lora_a=False)
    start = wire.to_arrays(dep.model)
    results = []
    for _ in range(2):
        arrays, _ = node.train_round(dep, start, 1, node.plan_ledger(dep))
        results.append({k: v.numpy().copy() for k, v in arrays.items()})
    assert not all(np.array_equal(results[0][k], results[1][k]) for k in results[0])  # OS entropy


def test_the_node_store_keeps_one_id_for_ledger_reply_and_personal_state(tmp_path):
    from flwr.app import Array, ArrayRecord

    from fedlora.node_store import NodeStore

    store = NodeStore(str(tmp_path), "run-1", "node-0")
    paths = (store.ledger_path, store.reply_path, store.personal_dir)
    assert all(store.id in p and p.startswith(str(tmp_path)) for p in paths)
    assert NodeStore(str(tmp_path), "run-1", "node-1").id != store.id  # per node
    assert NodeStore(str(tmp_path), "run-2", "node-0").id != store.id  # per run
    arrays = ArrayRecord({"b": Array(torch.ones(2, 3).numpy())})
    store.save_reply(4, "digest", arrays, {"epsilon": 1.5})
    assert store.load_reply(4, "other-digest") is None and store.load_reply(3, "digest") is None
    again, metrics = store.load_reply(4, "digest")
    assert metrics == {"epsilon": 1.5} and (again["b"].numpy() == 1).all()
    assert store.load_personal(1) is None
    store.save_personal(1, arrays)
    assert store.load_personal(0) is None and store.load_personal(5) is not None


def test_micro_batch_size_reaches_local_training(run, monkeypatch):
    import dataclasses

    from fedlora import training

    seen = []
    real = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: seen.append(k.get("micro_batch_size")) or real(*a, **k))
    micro = dataclasses.replace(run, train=dataclasses.replace(run.train, micro_batch_size=4))
    rt = node.get_runtime(micro, {"partition-id": 0, "num-partitions": 3}, LABELS, train_lora_a=False)
    node.train_round(rt, wire.to_arrays(rt.model), 1, node.plan_ledger(rt))
    assert seen == [4]


def test_per_group_clipping_reaches_the_dp_optimizer_with_head_and_adapter_groups(run, monkeypatch):
    import dataclasses

    from fedlora import privacy
    from fedlora.config import Clipping
    from fedlora.model import is_head

    seen = []
    real = privacy.dp_optimizer
    monkeypatch.setattr(privacy, "dp_optimizer", lambda *a: seen.append(a) or real(*a))
    grouped = dataclasses.replace(run, dp=dataclasses.replace(run.dp, clipping=Clipping.PER_GROUP, head_share=0.3))
    rt = node.get_runtime(grouped, {"partition-id": 0, "num-partitions": 3}, LABELS, train_lora_a=False)
    node.train_round(rt, wire.to_arrays(rt.model), 1, node.plan_ledger(rt))
    (args,) = seen
    optimizer, groups, norms = args[0], args[5], args[6]
    names = [n for n, p in rt.model.named_parameters() if p.requires_grad]
    assert groups == [0 if is_head(n) else 1 for n in names] and set(groups) == {0, 1}
    assert [p for g in optimizer.param_groups for p in g["params"]] == rt.trainable()  # the groups follow the optimizer's order
    assert norms == grouped.dp.group_norms()


def test_a_cosine_schedule_sets_each_rounds_learning_rate(run, monkeypatch):
    import dataclasses
    import math

    from fedlora import training
    from fedlora.config import LRSchedule

    cosine = dataclasses.replace(run, train=dataclasses.replace(run.train, lr_schedule=LRSchedule.COSINE, learning_rate=0.4))
    total = cosine.num_server_rounds
    expected = [0.2 * (1 + math.cos(math.pi * (r - 1) / total)) for r in range(1, total + 1)]
    assert [training.round_learning_rate(cosine.train, r, total) for r in range(1, total + 1)] == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.4) and all(a > b for a, b in zip(expected, expected[1:]))
    assert training.round_learning_rate(run.train, 3, total) == run.train.learning_rate  # constant: the configured rate
    seen = []
    real = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", lambda *a: seen.append(a[2]) or real(*a))
    rt = node.get_runtime(cosine, {"partition-id": 0, "num-partitions": 3}, LABELS, train_lora_a=False)
    node.train_round(rt, wire.to_arrays(rt.model), 2, node.plan_ledger(rt))
    assert seen == [pytest.approx(expected[1])]


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_without_dp_each_sample_is_clipped_without_noise_unless_max_grad_norm_is_0(run, monkeypatch, clip):
    import dataclasses

    from fedlora import privacy

    seen = []
    real = privacy.dp_optimizer
    monkeypatch.setattr(privacy, "dp_optimizer", lambda *a: seen.append(a) or real(*a))
    plain = dataclasses.replace(run, dp=dataclasses.replace(run.dp, epsilon=0.0, max_grad_norm=clip))
    plain = dataclasses.replace(plain, train=dataclasses.replace(plain.train, optimizer="sgd", learning_rate=1.0))
    rt = node.get_runtime(plain, {"partition-id": 0, "num-partitions": 3}, LABELS, train_lora_a=False)
    start = wire.to_arrays(rt.model)
    arrays, metrics = node.train_round(rt, start, 1, None)
    update = np.sqrt(sum(float(np.sum((arrays[k].numpy() - start[k].numpy()) ** 2)) for k in arrays.keys()))
    assert metrics["epsilon"] == 0.0 and update > 0
    if clip:
        ((_, ledger, max_grad_norm, expected, generator, *_),) = seen
        assert ledger is None and generator is None and max_grad_norm == clip and expected == plain.train.batch_size  # no noise
        # Each step moves by at most lr x clip: the mean of gradients clipped to 1e-3.
        assert update <= plain.train.local_steps * clip * (1 + 1e-4)
    else:
        assert seen == [] and update > 2 * plain.train.local_steps * 1e-3  # plain steps move past what clipping at 1e-3 allows
