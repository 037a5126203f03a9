"""Data loading, label checks, partitioners, the default-dataset fallback, token cache."""

import json
import os
from collections import Counter

import datasets
import pytest

from fedlora import data as data_mod
from fedlora.config import ConfigError, parse_run_config
from fedlora.model import load_tokenizer

from conftest import make_rows, write_jsonl


def _cfg(**overrides):
    return parse_run_config(overrides)


def test_local_directory_in_each_format(tmp_path):
    rows = make_rows(40, seed=0)
    ds = datasets.Dataset.from_list(rows)
    for ext, writer in (
        ("jsonl", lambda d, p: write_jsonl(p, list(d))),
        ("csv", lambda d, p: d.to_csv(p, index=False)),
        ("parquet", lambda d, p: d.to_parquet(p)),
    ):
        d = tmp_path / ext
        d.mkdir()
        writer(ds, str(d / f"train.{ext}"))
        writer(ds.select(range(10)), str(d / f"validation.{ext}"))
        task = data_mod.load_task(_cfg(dataset=str(d)).data)
        assert (len(task.train), len(task.eval)) == (40, 10), ext
        assert task.label_names == ("0", "1") and not task.synthetic


def test_single_file_holds_out_an_eval_split(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", make_rows(100, seed=0))
    task = data_mod.load_task(_cfg(dataset=path).data)
    assert len(task.train) == 90 and len(task.eval) == 10


def test_pair_task_uses_two_text_columns(tmp_path):
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i % 2} for i in range(20)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    run = _cfg(dataset=str(tmp_path), **{"text-columns": "sentence1,sentence2"})
    task = data_mod.load_task(run.data)
    enc = data_mod.encode(task.train, load_tokenizer(run.model), task.text_columns, 32)
    assert (enc.tensors["token_type_ids"][0] == 1).any()  # the second segment is there


@pytest.mark.parametrize(
    "rows,overrides,key,fragment",
    [
        ([{"text": "x", "label": 0}, {"text": "y", "label": 1}], {"text-columns": "sentence"}, "text-columns", "'sentence' not in"),
        ([{"text": "x", "label": 0}, {"text": "y", "label": 1}], {"label-column": "target"}, "label-column", "column not in"),
        ([{"text": "x", "label": 0.5}, {"text": "y", "label": 1}], {}, "label-column", "all integers or all strings"),
        ([{"text": "x", "label": True}, {"text": "y", "label": False}], {}, "label-column", "found booleans"),
        ([{"text": "x", "label": "pos"}, {"text": "y", "label": 1}], {}, "label-column", "all integers or all strings"),
        ([{"text": "x", "label": -1}, {"text": "y", "label": 1}], {}, "label-column", ">= 0"),
    ],
)
def test_bad_columns_and_labels_name_the_key(tmp_path, rows, overrides, key, fragment):
    write_jsonl(tmp_path / "train.jsonl", rows * 5)
    with pytest.raises(ConfigError) as e:
        data_mod.load_task(_cfg(dataset=str(tmp_path), **overrides).data)
    assert e.value.key == key and fragment in str(e.value)


def test_eval_label_outside_the_label_set_fails(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(20, 0))
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "odd", "label": 2}])
    with pytest.raises(ConfigError, match=r"label 2 .* outside the label set") as e:
        data_mod.load_task(_cfg(dataset=str(tmp_path)).data)
    assert e.value.key == "label-column"


def test_string_labels_map_to_sorted_ids(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}] * 3)
    task = data_mod.load_task(_cfg(dataset=str(tmp_path)).data)
    assert task.label_names == ("neg", "pos")
    assert list(task.train["label"])[:2] == [1, 0]


def test_unreadable_or_missing_dataset_paths_fail(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as e:
        data_mod.load_task(_cfg(dataset=str(tmp_path / "nope")).data)
    assert e.value.key == "dataset"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="cannot read") as e:
        data_mod.load_task(_cfg(dataset=str(bad)).data)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no train"):
        data_mod.load_task(_cfg(dataset=str(empty)).data)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.jsonl"
        locked.write_text(json.dumps({"text": "a", "label": 0}) + "\n")
        locked.chmod(0)
        with pytest.raises(ConfigError, match="not readable"):
            data_mod.load_task(_cfg(dataset=str(locked)).data)


def test_default_dataset_uses_local_sst2_dir(tmp_path):
    write_jsonl(tmp_path / "sst2" / "train-00000-of-00001.jsonl", make_rows(30, 0))
    write_jsonl(tmp_path / "sst2" / "validation.jsonl", make_rows(10, 1))
    task = data_mod.load_task(_cfg(**{"data-dir": str(tmp_path)}).data)
    assert task.source == f"local:{tmp_path / 'sst2'}" and not task.synthetic and len(task.train) == 30


def test_default_dataset_falls_back_to_synthetic_only_when_nothing_found(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    monkeypatch.setattr(data_mod, "hub_reachable", lambda timeout=3.0: False)
    with caplog.at_level("WARNING", logger="fedlora"):
        task = data_mod.load_task(_cfg(**{"data-dir": str(tmp_path)}).data)
    assert task.synthetic and task.source == "synthetic" and task.label_names == ("negative", "positive")
    assert "SYNTHETIC" in caplog.text
    # A dataset named explicitly never falls back.
    with pytest.raises(ConfigError) as e:
        data_mod.load_task(_cfg(dataset="someone/sst2-copy").data)
    assert e.value.key == "dataset" and "hub" in str(e.value)


def _labels(ds):
    return list(ds["label"])


def test_partitioners_split_disjointly_and_as_configured():
    ds = datasets.Dataset.from_list([{"text": f"t{i}", "label": i % 4} for i in range(400)])
    ds = ds.add_column("row", list(range(400)))
    for method in ("iid", "dirichlet", "pathological"):
        p = _cfg(**{"partition.method": method, "partition.alpha": 0.3, "partition.classes-per-client": 2}).partition
        parts = [data_mod.partition(ds, p, i, 4, seed=0) for i in range(4)]
        rows = [r for part in parts for r in part["row"]]
        assert len(rows) == len(set(rows)), method  # disjoint
        if method == "iid":
            assert sorted(len(x) for x in parts) == [100] * 4
        if method == "pathological":
            assert all(len(set(_labels(x))) <= 2 for x in parts)
        if method == "dirichlet":
            # alpha 0.3: clearly skewed label mixes
            shares = [max(Counter(_labels(x)).values()) / len(x) for x in parts]
            assert max(shares) > 0.4


def test_token_cache_round_trip(tmp_path, task_dir):
    run = _cfg(dataset=task_dir)
    task = data_mod.load_task(run.data)
    tok = load_tokenizer(run.model)
    first = data_mod.encode(task.train, tok, ("text",), 32, cache_key="k", cache_dir=str(tmp_path))
    files = os.listdir(tmp_path / "tokens")
    assert len(files) == 1 and files[0].endswith(".safetensors")  # no pickle: loading it runs no code
    second = data_mod.encode(task.train, tok, ("text",), 32, cache_key="k", cache_dir=str(tmp_path))
    for k in first.tensors:
        assert (first.tensors[k] == second.tensors[k]).all()
    batch = first.batch([0, 1, 2])
    assert batch["input_ids"].shape[1] == int(first.tensors["attention_mask"][[0, 1, 2]].sum(1).max())


def test_a_dataset_with_one_class_is_refused(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": 0} for i in range(10)])
    with pytest.raises(ConfigError, match="at least two classes") as e:
        data_mod.load_task(_cfg(dataset=str(tmp_path)).data)
    assert e.value.key == "label-column"


def test_an_empty_partition_is_refused():
    ds = datasets.Dataset.from_list([{"text": f"t{i}", "label": i % 2} for i in range(3)])
    p = _cfg().partition
    with pytest.raises(ConfigError, match="partition 3 of 5") as e:
        for i in range(5):
            data_mod.partition(ds, p, i, 5, seed=0)
    assert e.value.key == "partition.method"


def test_empty_and_overlong_texts_are_handled(task_dir):
    # Documented handling: empty text becomes [CLS] [SEP]; longer text is truncated to max-length.
    run = _cfg(dataset=task_dir)
    ds = datasets.Dataset.from_list([{"text": "", "label": 0}, {"text": "word " * 500, "label": 1}])
    enc = data_mod.encode(ds, load_tokenizer(run.model), ("text",), 32)
    lengths = enc.tensors["attention_mask"].sum(1).tolist()
    assert lengths == [2, 32] and enc.tensors["input_ids"].shape == (2, 32)


def test_a_process_serving_many_nodes_splits_the_data_once(monkeypatch):
    ds = datasets.Dataset.from_list([{"text": f"t{i}", "label": i % 2} for i in range(100)])
    p = _cfg(**{"partition.method": "dirichlet"}).partition
    built = []
    real = data_mod._partitioner
    monkeypatch.setattr(data_mod, "_partitioner", lambda *a: built.append(a) or real(*a))
    data_mod._PARTITIONERS.clear()
    parts = [data_mod.partition(ds, p, i, 10, seed=0) for i in range(10)]
    assert len(built) == 1 and sum(len(x) for x in parts) == 100
    data_mod.partition(ds, p, 0, 10, seed=1)  # another seed: another split
    assert len(built) == 2


def test_dirichlet_over_a_thousand_partitions_splits_and_an_empty_one_is_refused_alone():
    # flwr-datasets redraws until every partition reaches its minimum size and gives up after 10
    # draws: with a minimum of 1, Dirichlet(0.5) over 1,000 partitions failed for every node.
    ds = datasets.Dataset.from_list([{"text": f"t{i}", "label": i % 2} for i in range(5000)])
    p = _cfg(**{"partition.method": "dirichlet"}).partition
    data_mod._PARTITIONERS.clear()
    sizes, empty = [], 0
    for i in range(1000):
        try:
            sizes.append(len(data_mod.partition(ds, p, i, 1000, seed=0)))
        except ConfigError as e:
            assert e.key == "partition.method" and "is empty" in str(e)
            empty += 1
    assert sum(sizes) == 5000 and len(sizes) + empty == 1000 and len(sizes) > 500
