"""The benchmark scripts that are cheap enough to run here."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accountant_benchmark_checks_our_figures_equal_opacus_and_prints_ratios():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "accountant.py"), "--sizes", "800", "--steps", "4", "--repeat", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]  # the script exits non-zero when a figure differs from Opacus'
    (row,) = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["800"]]
    assert row[1] == "0.0200" and float(row[2]) > 0 and float(row[5]) > 0 and float(row[8]) > 0
