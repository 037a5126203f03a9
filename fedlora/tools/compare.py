"""``fedlora compare``: run a grid of Flower simulations, one folder per run.

A grid file (TOML, or YAML with the same structure) names the runs::

    output-dir = "experiments/results/sst2"   # relative to the working directory
    [base]                                    # run config shared by every run
    dataset = "$FEDLORA_DATA_DIR/sst2"        # $VARS in strings are expanded
    num-server-rounds = 5
    [grid]                                    # the cartesian product of these lists
    strategy = ["lora", "ffa-lora"]
    "dp.epsilon" = [0, 3]
    seed = [0, 1, 2]
    [[rules]]                                 # per-run settings that depend on others
    when = { strategy = "ffa-lora" }
    set = { learning-rate = 4.0 }

``grid`` may also be an array of tables (``[[grid]]``): the union of their
products, for grids that are not one rectangle. Flags add to the file
(``--set key=value``, ``--grid key=v1,v2``) or replace it.

Each run is a fresh subprocess (``python -m fedlora.simulation``), so memory
and Ray are released between runs. A run with ``result.json`` is complete and
is skipped; one with a checkpoint resumes from it; one with neither starts
over. A complete run whose config differs from the grid's is an error, not a
silent reuse.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..config import DEFAULTS, ConfigError, parse_run_config
from ..run_folder import portable
from ..simulation import DEFAULT_NODES, NODES_KEY

GRID_KEYS = ("output-dir", "description", "base", "grid", "rules")
RESULT = "result.json"
SPEC = "grid-spec.json"  # the run's grid entry as written (unexpanded), saved when it completes


class GridError(ValueError):
    """A grid file or flag that cannot be run."""


class GridStopped(Exception):
    """The grid received SIGTERM (a scheduler, ``kill``, ``docker stop``) or SIGHUP."""


def _raise_stopped(signum, frame) -> None:
    raise GridStopped


@dataclass
class Grid:
    output_dir: str
    base: dict[str, Any] = field(default_factory=dict)
    axes: list[dict[str, list[Any]]] = field(default_factory=lambda: [{}])
    rules: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True)
class RunSpec:
    name: str
    overrides: dict[str, Any]  # as the grid says: "$VARS" not yet expanded

    def expanded(self) -> dict[str, Any]:
        return {k: os.path.expandvars(v) if isinstance(v, str) else v for k, v in self.overrides.items()}


def parse_value(text: str) -> Any:
    """A flag value as TOML would read it (3 -> int, 1e-5 -> float, true -> bool), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# What a grid may set: the run config, plus the number of simulated nodes.
GRID_DEFAULTS = {**DEFAULTS, NODES_KEY: DEFAULT_NODES}


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in GRID_DEFAULTS:
            raise GridError(f"{where}: unknown run-config key {key!r}")


def load_grid(path: str | None, sets: list[str] = (), grids: list[str] = (), output_dir: str | None = None) -> Grid:
    raw: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                raw = yaml.safe_load(f) or {}
            else:
                raw = tomllib.load(f)
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown top-level key {unknown[0]!r} (known: {', '.join(GRID_KEYS)})")
    base = dict(raw.get("base", {}))
    axes = raw.get("grid", {})
    axes = [dict(a) for a in axes] if isinstance(axes, list) else [dict(axes)]
    rules = []
    for i, rule in enumerate(raw.get("rules", [])):
        if set(rule) != {"when", "set"}:
            raise GridError(f"{path}: rules[{i}] needs exactly 'when' and 'set' tables")
        _check_keys(rule["when"], f"{path}: rules[{i}].when")
        _check_keys(rule["set"], f"{path}: rules[{i}].set")
        rules.append((dict(rule["when"]), dict(rule["set"])))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise GridError(f"--set {item!r}: expected key=value")
        base[key.strip()] = parse_value(value.strip())
    for item in grids:
        key, sep, values = item.partition("=")
        if not sep:
            raise GridError(f"--grid {item!r}: expected key=v1,v2,...")
        for axis in axes:
            axis[key.strip()] = [parse_value(v.strip()) for v in values.split(",")]
    _check_keys(base, f"{path or 'flags'}: base")
    for axis in axes:
        _check_keys(axis, f"{path or 'flags'}: grid")
        for key, values in axis.items():
            if not isinstance(values, list) or not values:
                raise GridError(f"{path or 'flags'}: grid key {key!r} needs a non-empty list of values")
    out = output_dir or raw.get("output-dir")
    if not out:
        raise GridError("no output directory: give --output-dir or output-dir in the grid file")
    return Grid(output_dir=out, base=base, axes=axes, rules=rules)


def _name_part(key: str, value: Any) -> str:
    text = f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
    return re.sub(r"[^A-Za-z0-9=._+-]", "_", text)


def expand(grid: Grid) -> list[RunSpec]:
    """Every run of the grid, named by the keys that vary, each config validated."""
    combos = []
    for axis in grid.axes:
        keys = list(axis)
        for values in itertools.product(*(axis[k] for k in keys)):
            combos.append(dict(zip(keys, values)))
    varying = list(dict.fromkeys(k for axis in grid.axes for k in axis))
    specs, seen = [], {}
    for combo in combos:
        overrides = {**grid.base, **combo}
        for when, sets in grid.rules:
            if all(overrides.get(k, GRID_DEFAULTS[k]) == v for k, v in when.items()):
                overrides.update(sets)
        name = "__".join(_name_part(k, combo[k]) for k in varying if k in combo) or "run"
        if name in seen:
            if seen[name] == overrides:
                continue  # the same run listed twice by overlapping grids
            raise GridError(f"two different runs would share the folder {name!r}")
        spec = RunSpec(name, overrides)
        try:
            parse_run_config({k: v for k, v in spec.expanded().items() if k != NODES_KEY})
        except ConfigError as e:
            raise GridError(f"run {name}: {e}") from e
        seen[name] = overrides
        specs.append(spec)
    return specs


def run_state(run_dir: str, spec: RunSpec) -> str:
    """'done', 'partial' (a checkpoint to resume), or 'new'."""
    if os.path.isfile(os.path.join(run_dir, RESULT)):
        try:
            with open(os.path.join(run_dir, SPEC)) as f:
                recorded = json.load(f)
        except FileNotFoundError:
            # Finished, but compare stopped before recording its spec: accept it if its config matches.
            with open(os.path.join(run_dir, "config.json")) as f:
                config = json.load(f)["run-config"]
            wanted = {k: v for k, v in _run_overrides(spec, run_dir).items() if k not in ("output-dir", "run-name", NODES_KEY)}
            # config.json records paths under the data directory relative to it.
            wanted = portable(wanted, wanted.get("data-dir") or os.environ.get("FEDLORA_DATA_DIR", ""))
            if any(config.get(k) != v for k, v in wanted.items()):
                raise GridError(f"{run_dir} is a complete run not made by this grid (no {SPEC}): move it away") from None
            recorded = spec.overrides
            with open(os.path.join(run_dir, SPEC), "w") as f:
                json.dump(recorded, f, indent=2)
        diff = sorted(k for k in set(recorded) | set(spec.overrides) if recorded.get(k) != spec.overrides.get(k))
        if diff:
            raise GridError(f"{run_dir} is a complete run with a different config ({', '.join(diff)}): move it away or use another output-dir")
        return "done"
    return "partial" if os.path.isfile(os.path.join(run_dir, "checkpoint.json")) else "new"


def _run_overrides(spec: RunSpec, run_dir: str) -> dict[str, Any]:
    """What the subprocess gets: the spec plus where to write (keys that do not change the result)."""
    parent, name = os.path.split(os.path.abspath(run_dir))
    return {**spec.expanded(), "output-dir": parent, "run-name": name}


class Progress:
    """A grid bar and a round bar (tqdm on a terminal; plain lines otherwise)."""

    def __init__(self, total: int, done: int) -> None:
        self.tty = sys.stderr.isatty()
        self.total = total
        if self.tty:
            from tqdm import tqdm

            self.grid = tqdm(total=total, initial=done, desc="grid", unit="run", position=0)
            self.rounds = tqdm(total=0, desc="run", unit="round", position=1, leave=False)

    def start_run(self, index: int, name: str, rounds: int, done_rounds: int) -> None:
        if self.tty:
            self.rounds.reset(total=rounds)
            self.rounds.update(done_rounds)
            self.rounds.set_description(name[:60])
        else:
            print(f"[{index}/{self.total}] {name}: starting at round {done_rounds + 1}/{rounds}", flush=True)

    def round(self, row: dict[str, Any]) -> None:
        acc = "not evaluated" if row.get("accuracy") is None else f"acc {row['accuracy']:.4f}"  # eval.every, or causal-lm's loss only
        text = f"{acc} eps {row['epsilon']:.2f}"
        if self.tty:
            self.rounds.update(1)
            self.rounds.set_postfix_str(text)
        else:
            print(f"    round {row['round']}: {text}", flush=True)

    def local(self, line: str) -> None:
        if self.tty:  # a node's latest local-training line, e.g. "[node 1 round 2] step 5/10 loss 0.6"
            self.rounds.set_postfix_str(line[-60:])

    def end_run(self, status: str, name: str, seconds: float) -> None:
        if self.tty:
            self.grid.update(1)
            self.grid.set_postfix_str(f"last: {status}")
        else:
            print(f"    {name}: {status} in {seconds:.0f}s", flush=True)

    def close(self) -> None:
        if self.tty:
            self.rounds.close()
            self.grid.close()


_STEP_LINE = re.compile(r"(\[node [^\]]+\] step \d+/\d+ loss [0-9.]+)")


def _rows(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_one(spec: RunSpec, run_dir: str, state: str, progress: Progress, index: int, timeout: float | None) -> tuple[str, float]:
    """Run (or resume) one simulation in a subprocess; returns (status, seconds)."""
    if state == "new" and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a run that died before its first checkpoint: nothing to keep
    overrides = {**_run_overrides(spec, run_dir), "resume": state == "partial"}
    os.makedirs(os.path.dirname(os.path.abspath(run_dir)), exist_ok=True)
    rounds = int(overrides.get("num-server-rounds", DEFAULTS["num-server-rounds"]))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    seen = len([r for r in _rows(metrics) if r["round"] > 0])
    progress.start_run(index, spec.name, rounds, seen)
    log_path = os.path.abspath(run_dir) + ".log"  # beside the run: the folder may not exist yet
    start = time.monotonic()
    with open(log_path, "a") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedlora.simulation", "--overrides", json.dumps(overrides)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_run reaches its Ray processes
        )
        with open(log_path) as tail:
            tail.seek(0, os.SEEK_END)
            try:
                while proc.poll() is None:
                    time.sleep(1.0)
                    for line in tail.readlines():
                        m = _STEP_LINE.search(line)
                        if m:
                            progress.local(m.group(1))
                    rows = [r for r in _rows(metrics) if r["round"] > 0]
                    for row in rows[seen:]:
                        progress.round(row)
                    seen = max(seen, len(rows))
                    if timeout and time.monotonic() - start > timeout:
                        stop_run(proc)
                        return f"timed out after {timeout:.0f}s (see {log_path})", time.monotonic() - start
            except BaseException:  # Ctrl-C or SIGTERM: the run, in its own group, got neither
                stop_run(proc)
                raise
    seconds = time.monotonic() - start
    if proc.returncode != 0 or not os.path.isfile(os.path.join(run_dir, RESULT)):
        return f"failed (exit {proc.returncode}; see {log_path})", seconds
    with open(os.path.join(run_dir, SPEC), "w") as f:
        json.dump(spec.overrides, f, indent=2)
    return "done", seconds


def stop_run(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """End a run's subprocess and every process it started (Ray's raylet, workers
    and agents) when the grid stops or times it out. Left running, they would go
    on writing the run folder that the next ``fedlora compare`` resumes. The run
    leads its own process group (``run_one``), so its Ray processes share it:
    SIGINT to the group first (the simulation shuts Ray down on it), SIGTERM after
    ``grace`` seconds, then SIGKILL to whatever is left in the group."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0)):
        if proc.poll() is not None:
            break
        _signal_group(proc, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_group(proc, signal.SIGKILL)  # Ray's agents can outlive the run's own process
    proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if os.name != "posix":  # no process groups: the run's own process only
        if proc.poll() is None:
            if sig == signal.SIGKILL:
                proc.kill()
            else:
                proc.send_signal(sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def select(specs: list[RunSpec], only: list[str]) -> list[RunSpec]:
    """The runs matching every ``KEY=VALUE`` of ``only`` (e.g. seed=0 first, the rest later)."""
    for item in only:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in GRID_DEFAULTS:
            raise GridError(f"--only {item!r}: expected run-config-key=value")
        key, wanted = key.strip(), parse_value(value.strip())
        specs = [s for s in specs if s.overrides.get(key, GRID_DEFAULTS[key]) == wanted]
    return specs


def _log_run(log_path: str, name: str, status: str, seconds: float, resumed: bool) -> None:
    row = {"run": name, "status": status, "wall_seconds": round(seconds, 1), "resumed": resumed, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(log_path, "a") as f:
        f.write(json.dumps(row) + "\n")


def run_grid(grid: Grid, *, dry_run: bool = False, timeout: float | None = None, only: list[str] = ()) -> int:
    specs = select(expand(grid), list(only))
    out = grid.output_dir
    states = {s.name: run_state(os.path.join(out, s.name), s) for s in specs}
    todo = [s for s in specs if states[s.name] != "done"]
    print(
        f"grid: {len(specs)} runs in {out}: {len(specs) - len(todo)} complete, {len(todo)} to run ({sum(states[s.name] == 'partial' for s in todo)} resuming)",
        flush=True,
    )
    if dry_run:
        for s in specs:
            print(f"  {states[s.name]:8} {s.name}")
        return 0
    os.makedirs(out, exist_ok=True)
    progress = Progress(len(specs), len(specs) - len(todo))
    failures = []
    log_path = os.path.join(out, "grid-log.jsonl")
    try:
        for i, spec in enumerate(todo, start=len(specs) - len(todo) + 1):
            started = time.monotonic()
            try:
                status, seconds = run_one(spec, os.path.join(out, spec.name), states[spec.name], progress, i, timeout)
            except (KeyboardInterrupt, GridStopped):
                # Logged so that the run's minutes (summed over the log) include this part.
                _log_run(log_path, spec.name, "stopped", time.monotonic() - started, states[spec.name] == "partial")
                raise
            _log_run(log_path, spec.name, status, seconds, states[spec.name] == "partial")
            progress.end_run(status, spec.name, seconds)
            if status != "done":
                failures.append((spec.name, status))
    finally:
        progress.close()
    for name, status in failures:
        print(f"FAILED {name}: {status}", file=sys.stderr)
    print(f"grid: {len(specs) - len(failures)}/{len(specs)} runs complete in {out}", flush=True)
    return 1 if failures else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid_file", nargs="?", help="TOML or YAML grid file")
    p.add_argument("--output-dir", help="where the run folders go (overrides the grid file)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config value for every run")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="add a grid axis")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which one run is killed")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE", help="run only the grid's runs with this value")


def main(args: argparse.Namespace) -> int:
    # SIGHUP too (the terminal closed): the run leads its own process group, so only we can stop it.
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig is not None}
    try:
        grid = load_grid(args.grid_file, args.set, args.grid, args.output_dir)
        return run_grid(grid, dry_run=args.dry_run, timeout=args.timeout, only=args.only)
    except (GridError, OSError, tomllib.TOMLDecodeError) as e:
        print(f"fedlora compare: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, GridStopped) as e:
        print("fedlora compare: stopped; the same command resumes the grid from each run's last checkpoint", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
