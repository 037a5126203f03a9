"""The committed experiment grids and docs/RESULTS.md stay in step: every grid
file loads and validates, matches the runs recorded under experiments/results/
(a changed grid file with old results is an error, not a silent mix), and the
tables in docs/RESULTS.md are exactly what experiments/results_tables.py prints
from those runs."""

import glob
import os
import subprocess
import sys

import pytest

from fedlora.tools import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.toml")))


def test_there_are_grid_files():
    assert {os.path.basename(g) for g in GRIDS} >= {"sst2-sweep.toml", "sst2.toml", "sst2-alpha.toml", "rte.toml", "sst2-methods.toml"}


@pytest.mark.parametrize("path", GRIDS, ids=os.path.basename)
def test_grid_file_validates_and_matches_its_recorded_runs(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # output-dir is relative to the repository
    monkeypatch.setenv("FEDLORA_DATA_DIR", "/nonexistent")  # expanded only when a run starts
    grid = compare.load_grid(path)
    specs = compare.expand(grid)
    assert specs and len({s.name for s in specs}) == len(specs)
    for s in specs:  # every complete run carries its spec (else run_state would write one into the repo)
        run_dir = os.path.join(ROOT, grid.output_dir, s.name)
        if os.path.exists(os.path.join(run_dir, compare.RESULT)):
            assert os.path.exists(os.path.join(run_dir, compare.SPEC)), run_dir
    # A dry run reads every recorded run: a complete run whose config differs raises GridError.
    assert compare.run_grid(grid, dry_run=True) == 0
    listing = capsys.readouterr().out
    assert listing.count("\n  ") == len(specs)


def test_results_md_tables_are_what_the_committed_runs_give():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "results_tables.py")], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    with open(os.path.join(ROOT, "docs", "RESULTS.md")) as f:
        doc = f.read()
    assert out.strip() and out.strip() in doc, "docs/RESULTS.md tables differ from `python experiments/results_tables.py`"


def test_constraints_pin_the_versions_the_committed_results_were_measured_with():
    import json
    import re

    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open(os.path.join(ROOT, "constraints.txt")).read(), re.M))
    recorded = set()
    for path in glob.glob(os.path.join(ROOT, "experiments", "results", "**", "config.json"), recursive=True):
        versions = json.load(open(path))["versions"]
        recorded.add(tuple(sorted((k, v.split("+")[0]) for k, v in versions.items() if k != "python")))
    assert len(recorded) == 1, "the committed results were measured with several version sets"
    for package, version in next(iter(recorded)):
        assert pins.get(package) == version, package


def test_committed_results_record_the_data_and_output_relative_to_their_directories():
    import json

    for path in glob.glob(os.path.join(ROOT, "experiments", "results", "**", "config.json"), recursive=True):
        config = json.load(open(path))
        values = [
            config["run-config"]["dataset"],
            config["resolved"]["data"]["dataset"],
            config["resolved"]["data"]["data_dir"],
            config["data"]["source"],
            config["model"]["path"],
            config["run-config"]["output-dir"],
            config["resolved"]["output_dir"],
        ]
        assert not any(v.startswith("/") or v.startswith("local:/") for v in values), (path, values)
