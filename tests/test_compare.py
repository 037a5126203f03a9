"""`fedlora compare`: grid files and flags expand to validated, named runs;
runs go one subprocess at a time, complete runs are skipped, an interrupted
grid resumes mid-run, and a changed grid does not silently reuse old results."""

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedlora.tools.compare import GridError, expand, load_grid, parse_value


def _grid_file(tmp_path, text: str) -> str:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return str(path)


def test_grid_file_union_rules_flags_and_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_DATA", "/data/here")
    path = _grid_file(
        tmp_path,
        """
output-dir = "out"
[base]
dataset = "$MY_DATA/sst2"
num-server-rounds = 2
[[grid]]
seed = [0, 1]
strategy = ["lora", "ffa-lora"]
[[grid]]
seed = [0]
strategy = ["ffa-lora"]
"dp.epsilon" = [1.0]
[[rules]]
when = { strategy = "ffa-lora" }
set = { learning-rate = 8.0 }
""",
    )
    grid = load_grid(path, sets=["local-steps=3"], grids=[])
    specs = expand(grid)
    names = [s.name for s in specs]
    assert names == [
        "seed=0__strategy=lora",
        "seed=0__strategy=ffa-lora",
        "seed=1__strategy=lora",
        "seed=1__strategy=ffa-lora",
        "seed=0__strategy=ffa-lora__dp.epsilon=1",
    ]
    by_name = {s.name: s for s in specs}
    assert by_name["seed=0__strategy=lora"].overrides == {"dataset": "$MY_DATA/sst2", "num-server-rounds": 2, "local-steps": 3, "seed": 0, "strategy": "lora"}
    assert by_name["seed=1__strategy=ffa-lora"].overrides["learning-rate"] == 8.0  # the rule applied
    assert "learning-rate" not in by_name["seed=1__strategy=lora"].overrides
    assert by_name["seed=0__strategy=lora"].expanded()["dataset"] == "/data/here/sst2"
    # --grid adds an axis to every grid table.
    specs = expand(load_grid(path, grids=["lora.alpha=8,32"]))
    assert len(specs) == 2 * 5 and all("lora.alpha=" in s.name for s in specs)


def test_only_selects_a_subset(tmp_path):
    from fedlora.tools.compare import select

    path = _grid_file(tmp_path, 'output-dir = "o"\n[grid]\nseed = [0, 1]\nstrategy = ["lora", "ffa-lora"]\n')
    specs = expand(load_grid(path))
    assert [s.name for s in select(specs, ["seed=1"])] == ["seed=1__strategy=lora", "seed=1__strategy=ffa-lora"]
    assert [s.name for s in select(specs, ["seed=0", "strategy=ffa-lora"])] == ["seed=0__strategy=ffa-lora"]
    assert select(specs, ["dp.epsilon=3.0"]) == specs  # the default value matches runs that do not set it
    with pytest.raises(GridError, match="--only 'nope=1'"):
        select(specs, ["nope=1"])


def test_flag_values_read_as_toml():
    assert parse_value("3") == 3 and parse_value("1e-5") == 1e-5 and parse_value("true") is True
    assert parse_value('"x"') == "x" and parse_value("ffa-lora") == "ffa-lora"


@pytest.mark.parametrize(
    "text, message",
    [
        ('output-dir = "o"\n[grid]\nno-such-key = [1]\n', "unknown run-config key 'no-such-key'"),
        ('output-dir = "o"\n[base]\nbatch-size = 0\n', "batch-size"),
        ('output-dir = "o"\n[grid]\nseed = []\n', "non-empty list"),
        ("[grid]\nseed = [1]\n", "no output directory"),
        ('output-dir = "o"\nsurprise = 1\n', "unknown top-level key 'surprise'"),
        ('output-dir = "o"\n[[rules]]\nwhen = {seed = 1}\n', "exactly 'when' and 'set'"),
    ],
)
def test_bad_grids_name_the_problem(tmp_path, text, message):
    with pytest.raises(GridError, match=message):
        expand(load_grid(_grid_file(tmp_path, text)))


def test_yaml_grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("output-dir: out\nbase:\n  local-steps: 2\ngrid:\n  strategy: [lora, ffa-lora]\n")
    assert [s.name for s in expand(load_grid(str(path)))] == ["strategy=lora", "strategy=ffa-lora"]


def _tiny_grid(tmp_path, task_dir, tiny_model_dir, rest: str) -> str:
    """A grid of tiny runs (2 nodes, the tiny model and task) in ``tmp_path``; ``rest``
    continues its ``[base]`` table."""
    base = f"""
output-dir = "{tmp_path / "grid"}"
[base]
dataset = "{task_dir}"
model = "{tiny_model_dir}"
cache-dir = "{tmp_path / "cache"}"
num-partitions = 2
batch-size = 16
"""
    return _grid_file(tmp_path, base + rest)


def _compare(*args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "fedlora.tools.cli", "compare", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _start_compare(grid: str, cwd, stderr) -> subprocess.Popen:
    """`fedlora compare grid` in the background, in its own process group (to signal or kill)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedlora.tools.cli", "compare", grid], cwd=cwd, start_new_session=True, stdout=subprocess.PIPE, stderr=stderr, text=True
    )


def _signal_grid(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the grid's process group and to its run's, which leads its own."""
    groups = {proc.pid}
    for pid in _descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def _rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_grid_runs_skips_resumes_and_refuses_changed_config(tmp_path, task_dir, tiny_model_dir):
    grid = _tiny_grid(
        tmp_path,
        task_dir,
        tiny_model_dir,
        """
num-server-rounds = 3
local-steps = 4
learning-rate = 0.5
[grid]
strategy = ["lora", "ffa-lora"]
""",
    )
    # Interrupt the grid inside round 2 of the first run: once it has checkpointed
    # round 1 and both nodes have sent their round-2 updates (the hard case for DP
    # ledgers: charged for round 2, which the resumed run repeats). A kill while a
    # node is still training would leave its ledger charged for an update never sent;
    # that node would then, rightly, run out of budget in the last round. So the
    # state is checked with the processes stopped, and only then killed.
    proc = _start_compare(grid, tmp_path, stderr=subprocess.STDOUT)
    first = tmp_path / "grid" / "strategy=lora"
    cache = tmp_path / "cache"

    def settled_in_round_2():
        """Both nodes sent round 2 and neither has charged its ledger beyond that."""
        try:
            replies = {}
            for path in (cache / "replies").glob("*.npz"):
                with np.load(path) as npz:
                    replies[path.stem] = json.loads(npz["__fedlora_reply__"].tobytes())["round"]
            spent = {path.stem: sum(h[2] for h in json.loads(path.read_text())["history"]) for path in (cache / "ledgers").glob("*.json")}
            checkpointed = json.loads((first / "checkpoint.json").read_text())["round"]
        except (OSError, ValueError, KeyError):  # not written yet, or being replaced right now
            return False
        # Round 1 checkpointed, both round-2 replies saved, each ledger charged for exactly
        # 2 rounds x 4 local steps (the window lasts until the server has aggregated round 2).
        return checkpointed == 1 and len(replies) == 2 and set(replies.values()) == {2} and all(spent.get(k) == 2 * 4 for k in replies)

    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "no checkpoint in time"
        if settled_in_round_2():
            _signal_grid(proc, signal.SIGSTOP)
            if settled_in_round_2():  # still so with every process of the run stopped
                break
            _signal_grid(proc, signal.SIGCONT)
        time.sleep(0.02)
    _signal_grid(proc, signal.SIGKILL)
    proc.wait()
    assert not (first / "result.json").exists()

    listing = _compare(grid, "--dry-run", cwd=tmp_path)
    assert listing.returncode == 0 and "0 complete, 2 to run (1 resuming)" in listing.stdout, listing.stdout + listing.stderr

    done = _compare(grid, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2/2 runs complete" in done.stdout
    for name in ("strategy=lora", "strategy=ffa-lora"):
        rows = _rows(tmp_path / "grid" / name / "metrics.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2, 3]  # the resumed run has every round once
        # Every node answered every round: a node that had already trained the
        # interrupted round sends that update again (its DP ledger would refuse a retrain).
        assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows[1:]), [r.get("failure_reasons") for r in rows]
        assert json.load(open(tmp_path / "grid" / name / "result.json"))["accuracy"] == rows[-1]["accuracy"]
        # Cumulative bytes carry across the resume.
        assert rows[-1]["cum_bytes_up"] == sum(r["bytes_up"] for r in rows)
    # Both nodes of the interrupted run sent their round-2 updates again instead of training.
    assert (tmp_path / "grid" / "strategy=lora.log").read_text().count("sending again the update already sent for this round") == 2
    log = _rows(tmp_path / "grid" / "grid-log.jsonl")
    assert [(r["run"], r["resumed"]) for r in log] == [("strategy=lora", True), ("strategy=ffa-lora", False)]

    again = _compare(grid, cwd=tmp_path)
    assert again.returncode == 0 and "2 complete, 0 to run" in again.stdout
    assert len(_rows(tmp_path / "grid" / "grid-log.jsonl")) == 2  # nothing ran

    changed = _compare(grid, "--set", "local-steps=5", cwd=tmp_path)
    assert changed.returncode == 2 and "different config (local-steps)" in changed.stderr


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_grid_goes_on(tmp_path, task_dir, tiny_model_dir):
    grid = _grid_file(
        tmp_path,
        f"""
output-dir = "{tmp_path / "grid"}"
[base]
model = "{tiny_model_dir}"
cache-dir = "{tmp_path / "cache"}"
num-partitions = 2
num-server-rounds = 1
local-steps = 2
batch-size = 16
[grid]
dataset = ["{tmp_path / "missing"}", "{task_dir}"]
""",
    )
    out = _compare(grid, cwd=tmp_path)
    assert out.returncode == 1
    assert "FAILED dataset=" in out.stderr and "1/2 runs complete" in out.stdout
    statuses = [r["status"] for r in _rows(tmp_path / "grid" / "grid-log.jsonl")]
    assert statuses[0].startswith("failed") and statuses[1] == "done"


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return [d for c in children for d in (c, *_descendants(c))]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def _group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (Linux /proc)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.split("/")[2]))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree from Linux /proc")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_grid_ends_its_run_and_logs_it(tmp_path, task_dir, tiny_model_dir, sig, code):
    """SIGTERM (a scheduler, `kill`) or SIGINT (Ctrl-C) to `fedlora compare` ends the
    run's subprocess and every process it started (Ray's), instead of leaving them
    writing the run folder that the next `fedlora compare` resumes; the stop is logged."""
    grid = _tiny_grid(tmp_path, task_dir, tiny_model_dir, "num-server-rounds = 200\nlocal-steps = 2\n")
    proc = _start_compare(grid, tmp_path, stderr=subprocess.PIPE)
    run = tmp_path / "grid" / "run"
    deadline = time.monotonic() + 300
    below: list[int] = []
    try:
        while not (run / "checkpoint.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        below = _descendants(proc.pid)
        assert below, "the run's subprocess should be running"
        proc.send_signal(sig)  # to the grid process only, not its group
        out, err = proc.communicate(timeout=120)
    finally:
        for pid in (proc.pid, *below):  # whatever a failure left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    assert proc.returncode == code, out + err
    assert "stopped; the same command resumes" in err
    time.sleep(1.0)
    assert [p for p in below if _alive(p)] == []
    assert _group(below[0]) == []  # the run led its own group: Ray's agents were in it too
    log = _rows(tmp_path / "grid" / "grid-log.jsonl")
    assert [(r["run"], r["status"]) for r in log] == [("run", "stopped")] and log[0]["wall_seconds"] > 0
    assert not (run / "result.json").exists()
    listing = _compare(grid, "--dry-run", cwd=tmp_path)
    assert "0 complete, 1 to run (1 resuming)" in listing.stdout, listing.stdout + listing.stderr
