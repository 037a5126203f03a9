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

from fedlora import compare

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
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "results_tables.py")],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    with open(os.path.join(ROOT, "docs", "RESULTS.md")) as f:
        doc = f.read()
    assert out.strip() and out.strip() in doc, "docs/RESULTS.md tables differ from `python experiments/results_tables.py`"
