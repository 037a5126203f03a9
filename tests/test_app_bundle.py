"""The app bundle `flwr run .` ships to every node: the package's app code
only; the experimenter's tools (fedlora/tools/), tests and docs stay home."""

import io
import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_bundle_holds_the_app_and_not_the_tools():
    from flwr.cli.build import build_fab_from_files

    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    files = {p: (ROOT / p).read_bytes() for p in tracked if (ROOT / p).is_file() and not p.startswith("experiments/results/")}
    fab, _ = build_fab_from_files(files)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    package = {p for p in files if p.startswith("fedlora/") and p.endswith(".py")}
    tools = {p for p in package if p.startswith("fedlora/tools/")}
    assert tools and not names & tools, names & tools
    assert package - tools <= names, (package - tools) - names  # every app module, strategies included
    assert "fedlora/strategies/ffa_lora.py" in names and "fedlora/client_app.py" in names
    assert not {n for n in names if n.startswith(("tests/", "docs/", "benchmarks/", "experiments/", "docker/"))}
