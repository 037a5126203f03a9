"""Atomic writes: the target holds the old content or the new, never a part."""

import numpy as np
import pytest

from fedlora import files


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "state.json"
    files.write_atomic(str(path), "old")
    files.write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new" and [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    files.write_atomic(str(path), "old")

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        files.write_atomic(str(path), "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temporary left


def test_write_npz_atomic_round_trips(tmp_path):
    path = str(tmp_path / "a.npz")
    files.write_npz_atomic(path, {"x": np.arange(3.0)})
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["x"], [0.0, 1.0, 2.0])
