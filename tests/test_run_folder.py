"""The run folder's files: machine-independent config, checkpoints, resume."""

import os
import sysconfig

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlora.run_folder import RunFolder, config_diff, portable


def test_paths_under_the_data_directory_are_recorded_relative_to_it(tmp_path):
    data = str(tmp_path / "data")
    site = sysconfig.get_paths()["purelib"]
    obj = {
        "dataset": f"{data}/sst2",
        "data_dir": data,
        "source": f"local:{data}/rte",
        "other": "/elsewhere/x",
        "model": os.path.join(site, "pkg", "model"),
        "similar": f"{data}2/sst2",
        "list": [f"{data}/a"],
    }
    assert portable(obj, data) == {
        "dataset": "$FEDLORA_DATA_DIR/sst2",
        "data_dir": "$FEDLORA_DATA_DIR",
        "source": "local:$FEDLORA_DATA_DIR/rte",
        "other": "/elsewhere/x",
        "model": "site-packages/pkg/model",
        "similar": f"{data}2/sst2",
        "list": ["$FEDLORA_DATA_DIR/a"],
    }
    assert portable(portable(obj, data), data) == portable(obj, data)  # idempotent: a resume compares both


def test_the_output_folder_under_the_working_directory_is_recorded_relative_to_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = os.getcwd()
    obj = {"output_dir": os.path.join(here, "experiments", "results", "sst2"), "cwd": here, "beside": here + "-other/x"}
    assert portable(obj, "") == {"output_dir": "experiments/results/sst2", "cwd": ".", "beside": here + "-other/x"}


def test_config_diff_ignores_removed_keys_and_defaults_added_ones():
    mine = {"a": 1, "group": {"x": 2, "new": 0}}
    theirs = {"a": 1, "removed": 3, "group": {"x": 2}}
    assert config_diff(mine, theirs, {"group": {"new": 0}}) == []
    assert config_diff(mine, theirs, {"group": {"new": 5}}) == ["group.new"]
    assert config_diff({**mine, "a": 2}, theirs, {"group": {"new": 0}}) == ["a"]


def test_checkpoint_keeps_the_latest_round_and_resume_drops_later_metrics(tmp_path):
    folder = RunFolder.new(str(tmp_path), "run")
    assert RunFolder.new(str(tmp_path), "run").name == "run-2"  # never reuses a folder
    for r in (0, 1, 2):
        folder.append_metrics(
            {"round": r, "accuracy": 0.5 + r / 10, "loss": 1.0, "epsilon": r, "seconds": 1.0, "cum_bytes_up": 10 * r, "cum_bytes_down": 20 * r}
        )
        if r:
            folder.write_checkpoint(r, ArrayRecord({"b": Array(np.full(3, r, np.float32))}), {7: 0.1 * r}, {"s": r})
    assert sorted(f for f in os.listdir(folder.path) if f.startswith("checkpoint-round")) == ["checkpoint-round2.npz"]
    folder.append_metrics({"round": 3, "accuracy": 0.9})  # a round that did not complete
    last, arrays, spent, state = folder.read_checkpoint()
    assert last == 2 and (arrays["b"].numpy() == 2).all() and spent == {7: 0.2} and state == {"s": 2}
    assert [r["round"] for r in folder.metrics()] == [0, 1, 2]
    assert folder.cum_bytes() == {"up": 20, "down": 40}
    result = folder.write_result()
    assert result["rounds"] == 2 and result["best_accuracy"] == 0.7 and os.path.isfile(folder.file("result.json"))
