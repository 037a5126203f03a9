"""Scale: 10, 100 and 1,000 virtual clients, 10 of them sampled per round.

    python benchmarks/scale.py [--clients 10,100,1000] [--sampled 10] [--rounds 3] [--dirichlet]
                               [--data-dir DIR] [--model M] [--local-steps 2] [--batch-size 16]
                               [--eval-examples 256] [--cpus-per-client 2] [--timeout 1200]
                               [--set KEY=VALUE] [--json FILE] [--keep] [--skip-trivial] [--skip-fedlora]
                               [--polling lean|flower|both]

For each number N of simulated nodes, each run in a fresh process (its own
Ray, FLWR_HOME, output and token cache in a temporary folder; one datasets
cache for the whole benchmark, filled once before the timed runs):

- Flower alone: a trivial ServerApp (Flower's FedAvg sampling 10 nodes per
  round) and a ClientApp that replies at once with a 4-value array, through
  the same simulation entry point as ``fedlora.simulation``. Its round time
  is Flower's framework time per round.
- fedlora: a DP (epsilon 3) FFA-LoRA simulation, fraction-train = 10 / N and
  min-train-nodes = 10, so 10 nodes train per round, each local-steps x
  batch-size; IID, and with --dirichlet also Dirichlet(0.5). SST-2 from
  --data-dir / $FEDLORA_DATA_DIR if it holds sst2/, else the built-in
  synthetic task written to files at SST-2's size (67,349 training sentences).

Per N it prints:
- start-up: process start -> the first round begins (with its parts: imports,
  the server's model and data, nodes connected, round 0's evaluation); and,
  since Ray's actors start while the server does and round 1 builds the model
  in them, the end of round 1 minus a steady round;
- the mean round wall time of rounds >= 2 (metrics.jsonl ``seconds``: from
  sampling to the metrics line, the server's evaluation included), the
  clients' time per round (max and sum of ``client-seconds``, max and sum of
  ``train-seconds``), how many of the sampled nodes no earlier round sampled
  (they build their data first), and Flower's round time with trivial work;
- the peak memory of the whole process tree: the sum of the resident memory
  of the run's process and all its descendants (Ray's included), sampled
  every 0.5 s; PSS next to it, which counts shared pages once.
Ratios: round time at N / at the smallest N (goal: about 1, independent of
N), start-up / 30 s (goal <= 1), peak memory / 6 GiB (goal < 1).

--polling: which loop hands the stored messages to the simulated nodes. ``lean``
(fedlora.simulation's default, ``pending_nodes_loop``) asks only the nodes with a
message waiting; ``flower`` is Flower's own loop, which asks every node every 0.1 s;
``both`` runs every kind with each, and prints the ratios lean / Flower's side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from typing import Any

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
GIB = 1024**3
STARTUP_GOAL_S = 30.0
MEMORY_GOAL_GIB = 6.0
SST2_TRAIN = 67349  # SST-2's training sentences: the synthetic stand-in's size
SAMPLE_EVERY_S = 0.5


# -- the child processes: one simulation each -------------------------------------------


class Events:
    """Wall-clock timestamps (time.time(), comparable with the parent's) appended to a JSONL file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, name: str, **fields: Any) -> None:
        # cpu: this (driver) process's CPU seconds so far, all threads: the SuperLink, the
        # ServerApp and Flower's simulation loop (the ClientApps run in Ray's actor processes).
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": name, "t": time.time(), "cpu": usage.ru_utime + usage.ru_stime, **fields}) + "\n")


def _run_flower(server_app, client_app, num_nodes: int, app_config: dict[str, Any], cpus_per_client: int, flower_polling: bool) -> None:
    """Flower's simulation exactly as ``fedlora.simulation.simulate`` runs it, for the trivial app."""
    sys.path.insert(0, ROOT)
    from fedlora.simulation import run_apps, write_pyproject

    with tempfile.TemporaryDirectory(prefix="scale-app-") as app_dir:
        write_pyproject(app_dir, "scale-trivial", ("scale:server", "scale:client"), app_config)
        run_apps(server_app, client_app, num_nodes, app_dir, cpus_per_client, fab_id="fedlora/scale-trivial", flower_polling=flower_polling)


def child_trivial(spec: dict[str, Any]) -> None:
    """Flower alone: FedAvg samples ``sampled`` of N nodes per round; each replies at once."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    events = Events(spec["events"])
    events("imported")
    client, server = ClientApp(), ServerApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = context.run_config
        nodes, sampled, rounds = int(cfg["nodes"]), int(cfg["sampled"]), int(cfg["rounds"])
        events("server-start")
        need = min(sampled, nodes)
        while (connected := len(list(grid.get_node_ids()))) < need:
            time.sleep(0.1)
        events("nodes-connected", nodes=connected)
        strategy = FedAvg(fraction_train=min(1.0, sampled / nodes), fraction_evaluate=0.0, min_train_nodes=need, min_evaluate_nodes=0, min_available_nodes=need)
        arrays = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            events("round-start", round=r)
            messages = list(strategy.configure_train(r, arrays, ConfigRecord(), grid))
            replies = list(grid.send_and_receive(messages=messages, timeout=600))
            new_arrays, _ = strategy.aggregate_train(r, replies)
            if new_arrays is not None:
                arrays = new_arrays
            events("round-end", round=r, seconds=time.perf_counter() - start, sampled=len(messages), replies=sum(m.has_content() for m in replies))

    app_config = {"nodes": spec["nodes"], "sampled": spec["sampled"], "rounds": spec["rounds"]}
    _run_flower(server, client, spec["nodes"], app_config, spec["cpus_per_client"], spec["flower_polling"])
    events("done")


def child_fedlora(spec: dict[str, Any]) -> None:
    """fedlora's own simulation (``fedlora.simulation.simulate``), its server's steps timestamped."""
    sys.path.insert(0, ROOT)
    from fedlora import experiment, server_app
    from fedlora.simulation import simulate
    from fedlora.strategies import FedLoraStrategy

    events = Events(spec["events"])
    events("imported")

    init, evaluate_round, configure_train, wait = (
        experiment.Experiment.__init__,
        experiment.Experiment.evaluate_round,
        FedLoraStrategy.configure_train,
        server_app.wait_for_nodes,
    )

    def timed_init(self, *a, **k):
        events("server-start")
        init(self, *a, **k)
        events("experiment-ready")

    def timed_wait(*a, **k):
        n = wait(*a, **k)
        events("nodes-connected", nodes=n)
        return n

    def timed_evaluate(self, server_round, arrays):
        events("eval-start", round=server_round)
        out = evaluate_round(self, server_round, arrays)
        events("eval-end", round=server_round)
        return out

    def timed_configure(self, server_round, *a, **k):
        events("round-start", round=server_round)
        return configure_train(self, server_round, *a, **k)

    experiment.Experiment.__init__ = timed_init
    experiment.Experiment.evaluate_round = timed_evaluate
    FedLoraStrategy.configure_train = timed_configure
    server_app.wait_for_nodes = timed_wait
    simulate(spec["overrides"], num_supernodes=spec["nodes"], cpus_per_client=spec["cpus_per_client"], flower_polling=spec["flower_polling"])
    events("done")


def child_warm(spec: dict[str, Any]) -> None:
    """Read the dataset once, so that every timed run finds it in the datasets cache
    (the first run would otherwise pay the conversion to Arrow alone)."""
    sys.path.insert(0, ROOT)
    from fedlora import data
    from fedlora.config import parse_run_config
    from fedlora.model import load_tokenizer

    run = parse_run_config({k: v for k, v in spec["overrides"].items() if k != "num-partitions"})
    data.load_task(run.data, kind=run.task)
    load_tokenizer(run.model)


# -- the parent: launch, watch memory, clean up -------------------------------------------


class Tree:
    """The resident memory of a process and all its descendants (psutil if
    installed, else /proc), and every process seen, to end them afterwards."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            import psutil

            self.psutil = psutil
            self.root = psutil.Process(pid)
        except ImportError:
            self.psutil = None
        self.seen: dict[int, Any] = {}  # pid -> psutil.Process, or its start time (from /proc)
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0

    def sample(self) -> None:
        rss = pss = 0
        if self.psutil:
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except self.psutil.Error:
                return
            for p in procs:
                self.seen.setdefault(p.pid, p)
                try:
                    m = p.memory_full_info()
                except self.psutil.AccessDenied:
                    m = p.memory_info()
                except self.psutil.Error:
                    continue
                rss += m.rss
                pss += getattr(m, "pss", m.rss)
        else:
            procs = _proc_tree(self.pid)
            page = os.sysconf("SC_PAGE_SIZE")
            for pid, start in procs.items():
                self.seen.setdefault(pid, start)
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        rss += int(f.read().split()[1]) * page
                except (OSError, ValueError, IndexError):
                    continue
            pss = rss  # /proc/*/statm has no PSS: report RSS for both
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def end(self, grace: float = 5.0) -> list[str]:
        """Terminate, then kill, every process of the tree still alive (only those:
        psutil checks a pid still belongs to the process seen). Returns the names of
        those that were left (the root's included, if it was still running)."""
        if self.psutil:
            try:
                for p in self.root.children(recursive=True):
                    self.seen.setdefault(p.pid, p)
            except self.psutil.Error:
                pass
            alive = [p for p in self.seen.values() if p.is_running()]
            names = []
            for p in alive:
                try:
                    names.append(p.name())
                except self.psutil.Error:
                    names.append(str(p.pid))
            for p in alive:
                try:
                    p.terminate()
                except self.psutil.Error:
                    pass
            _, still = self.psutil.wait_procs(alive, timeout=grace)
            for p in still:
                try:
                    p.kill()
                except self.psutil.Error:
                    pass
            return names
        self.seen.update(_proc_tree(self.pid))
        alive = [pid for pid, start in self.seen.items() if _start_time(pid) == start]
        names = []
        for pid in alive:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    names.append(f.read().strip())
            except OSError:
                names.append(str(pid))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive:
                if _start_time(pid) == self.seen[pid]:
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
            deadline = time.monotonic() + grace
            while sig == signal.SIGTERM and time.monotonic() < deadline and any(_start_time(p) == self.seen[p] for p in alive):
                time.sleep(0.2)
        return names


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # fields after the command name
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    s = _stat(pid)
    return int(s[19]) if s else None  # field 22: start time


def _proc_tree(root: int) -> dict[int, int]:
    """pid -> start time of ``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (s := _stat(int(d))):
            children.setdefault(int(s[1]), []).append(int(d))  # field 4: parent pid
            starts[int(d)] = int(s[19])
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            out[pid] = starts[pid]
            todo += children.get(pid, [])
    return out


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def launch(kind: str, spec: dict[str, Any], folder: str, timeout: float) -> dict[str, Any]:
    """Run one child process (``kind``: trivial, fedlora or warm) and watch its tree."""
    os.makedirs(folder, exist_ok=True)
    spec = {**spec, "events": os.path.join(folder, "events.jsonl")}
    spec_path = os.path.join(folder, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another Ray cluster
    env.update(
        {
            "FLWR_HOME": os.path.join(folder, "flwr-home"),
            "RAY_TMPDIR": folder,  # a short path: Ray's socket paths must fit 107 characters
            "FEDLORA_CACHE_DIR": os.path.join(folder, "cache"),
            # One datasets cache for the whole benchmark (warmed first), not the user's.
            "HF_DATASETS_CACHE": spec["datasets_cache"],
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
        }
    )
    log_path = os.path.join(folder, "log.txt")
    status = "done"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", kind, "--spec", spec_path], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        tree = Tree(proc.pid)
        try:
            while proc.poll() is None:
                tree.sample()
                if time.time() - t0 > timeout:
                    status = f"timed out after {timeout:.0f} s"
                    break
                time.sleep(SAMPLE_EVERY_S)
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            wall = time.time() - t0
            left = tree.end()
            proc.wait()
    if status == "done" and proc.returncode != 0:
        status = f"failed (exit {proc.returncode})"
    out = {
        "status": status,
        "wall_s": wall,
        "peak_rss_gib": tree.peak_rss / GIB,
        "peak_pss_gib": tree.peak_pss / GIB,
        "peak_processes": tree.peak_procs,
        "left_running": left,  # processes of the tree still running when it ended (then ended here)
        "log": log_path,
    }
    if kind == "warm":
        if status != "done":
            print(f"  reading the dataset: {status}; the end of {log_path}:\n{_tail(log_path)}", flush=True)
        return out
    events = _read_jsonl(spec["events"])
    first = {}
    for e in events:
        first.setdefault((e["event"], e.get("round")), e)

    def at(name: str, rnd: int | None = None) -> float | None:
        e = first.get((name, rnd))
        return e["t"] - t0 if e else None

    out["to_imported_s"] = at("imported")
    out["to_server_start_s"] = at("server-start")
    out["to_experiment_ready_s"] = at("experiment-ready")
    out["to_nodes_connected_s"] = at("nodes-connected")
    out["to_round0_evaluated_s"] = at("eval-end", 0)
    out["startup_s"] = at("round-start", 1)
    out["to_round1_done_s"] = at("round-end" if kind == "trivial" else "eval-end", 1)

    def driver_cpu(start: str, end: str, rnd: int) -> float | None:
        a, b = first.get((start, rnd)), first.get((end, rnd))
        return b["cpu"] - a["cpu"] if a and b and "cpu" in a and "cpu" in b else None

    if kind == "trivial":
        out["rounds"] = {
            e["round"]: {
                "seconds": e["seconds"],
                "sampled": e["sampled"],
                "replies": e["replies"],
                "driver_cpu_s": driver_cpu("round-start", "round-end", e["round"]),
            }
            for e in events
            if e["event"] == "round-end"
        }
    else:
        eval_s = {r: at("eval-end", r) - at("eval-start", r) for (name, r) in first if name == "eval-end" and at("eval-start", r) is not None}
        metrics = [p for p in _find(os.path.join(folder, "out"), "metrics.jsonl")]
        rows = [r for r in _read_jsonl(metrics[0]) if r["round"] > 0] if metrics else []
        seen: set[str] = set()
        for row in rows:  # the sampled nodes no earlier round sampled: they set up their data first
            row["new_nodes"] = len(set(row.get("client_metrics", {})) - seen)
            seen |= set(row.get("client_metrics", {}))
        out["rounds"] = {
            row["round"]: {
                "seconds": row["seconds"],
                "eval_seconds": eval_s.get(row["round"]),
                "replies": row.get("clients"),
                "sampled": row.get("sampled"),
                "failures": row.get("failures"),
                "new_nodes": row["new_nodes"],
                "train_seconds_max": row.get("train_seconds_max"),
                "client_seconds_max": row.get("client_seconds_max"),
                "client_seconds_sum": sum(float(m.get("client-seconds", 0.0)) for m in row.get("client_metrics", {}).values()),
                "train_seconds_sum": sum(float(m.get("train-seconds", 0.0)) for m in row.get("client_metrics", {}).values()),
                # configure_train to the end of the round's evaluation: the driver's CPU while the clients train.
                "driver_cpu_s": driver_cpu("round-start", "eval-end", row["round"]),
            }
            for row in rows
        }
        if status == "done" and len(rows) < spec["overrides"]["num-server-rounds"]:
            status = out["status"] = f"failed ({len(rows)} of {spec['overrides']['num-server-rounds']} rounds in metrics.jsonl)"
    if status != "done":
        print(f"  {kind} N={spec['nodes']}: {status}; the end of {log_path}:\n{_tail(log_path)}", flush=True)
    return out


def _find(folder: str, name: str) -> list[str]:
    return sorted(os.path.join(d, name) for d, _, files in os.walk(folder) if name in files)


def _mean_after_first(rounds: dict[int, dict[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over rounds >= 2 (round 1 starts Ray's actors and builds the
    model in them), or round 1's value when only one round ran."""
    values = [r[key] for n, r in sorted(rounds.items()) if n >= 2 and r.get(key) is not None]
    if not values:
        values = [r[key] for r in rounds.values() if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def summarise(res: dict[str, Any], actors: int) -> dict[str, Any]:
    rounds = res.get("rounds", {})
    out = {k: res.get(k) for k in ("status", "startup_s", "peak_rss_gib", "peak_pss_gib", "wall_s")}
    for key in ("seconds", "eval_seconds", "client_seconds_max", "train_seconds_max", "client_seconds_sum", "train_seconds_sum", "new_nodes", "driver_cpu_s"):
        out[key] = _mean_after_first(rounds, key)
    out["round1_s"] = rounds.get(1, {}).get("seconds")
    if res.get("to_round1_done_s") is not None and out["seconds"] is not None and len(rounds) > 1:
        # Round 1 also starts Ray's actors (in parallel with the server's own start) and builds
        # the model in them: what it takes beyond a steady round is start-up too.
        out["startup_actors_s"] = res["to_round1_done_s"] - out["seconds"]
    if out.get("eval_seconds") is not None and out.get("client_seconds_sum") is not None:
        # What the clients' own time and the server's evaluation leave: Flower, aggregation, waiting.
        out["rest_s"] = out["seconds"] - out["eval_seconds"] - out["client_seconds_sum"] / actors
    return out


# -- printing ------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_table(title: str, clients: list[int], rows: list[tuple[str, list[Any], str]]) -> None:
    width = max(len(r[0]) for r in rows) + 2
    print(f"\n{title}")
    print(" " * width + "".join(f"{'N=' + str(n):>12}" for n in clients) + "  goal")
    for label, values, goal in rows:
        print(f"{label:<{width}}" + "".join(f"{_fmt(v):>12}" for v in values) + (f"  {goal}" if goal else ""))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


FLOWER_POLLING = ", Flower's polling"  # the label suffix of the runs with Flower's own loop


def report(clients: list[int], results: dict[str, dict[int, dict[str, Any]]], actors: int) -> None:
    """One table per kind of run (``label``: trivial, iid or dirichlet, with
    ``FLOWER_POLLING`` appended for Flower's loop); with both loops, their ratios."""
    summaries = {label: {n: summarise(by_n[n], actors) if by_n.get(n, {}).get("status") == "done" else {} for n in clients} for label, by_n in results.items()}
    for label, by_n in results.items():
        suffix = FLOWER_POLLING if label.endswith(FLOWER_POLLING) else ""
        report_kind(label, by_n, clients, actors, summaries[label], summaries.get("trivial" + suffix, {}))
    pairs = [(label, label + FLOWER_POLLING) for label in results if label + FLOWER_POLLING in results]
    if pairs:
        rows = []
        for lean, flower in pairs:
            for key, what in (("seconds", "round s"), ("driver_cpu_s", "driver CPU s per round")):
                rows.append((f"{lean}: {what}, lean / Flower's", [_ratio(summaries[lean][n].get(key), summaries[flower][n].get(key)) for n in clients], ""))
        print_table("Lean polling against Flower's (measured side by side in this run)", clients, rows)


def report_kind(
    kind: str, by_n: dict[int, dict[str, Any]], clients: list[int], actors: int, s: dict[int, dict[str, Any]], flower: dict[int, dict[str, Any]]
) -> None:
    # s: per N, the summary of a complete run; nothing for a failed one.
    raw = {n: by_n[n] if s[n] else {} for n in clients}
    base = s[clients[0]].get("seconds")

    def of(key: str, src: dict[int, dict[str, Any]] = s, over: float | None = 1.0) -> list[Any]:
        """``key`` per N, divided by ``over`` (none where either is missing)."""
        return [_ratio(src[n].get(key), over) for n in clients]

    if kind.startswith("trivial"):
        rows = [
            ("start-up s (process start -> round 1 begins)", of("startup_s"), ""),
            ("start-up s, with Ray's actors (round 1 end - a round)", of("startup_actors_s"), ""),
            ("round s (mean of rounds >= 2)", of("seconds"), "Flower's own time per round"),
            (f"round / round at N={clients[0]}", of("seconds", over=base), "about 1"),
            ("  driver process CPU s per round", of("driver_cpu_s"), "SuperLink + ServerApp + simulation loop"),
            ("round 1 s (starts the actors)", of("round1_s"), ""),
            ("peak memory GiB, tree RSS", of("peak_rss_gib"), ""),
            ("peak memory GiB, tree PSS", of("peak_pss_gib"), ""),
            ("wall s, whole process", of("wall_s"), ""),
        ]
        print_table(f"Flower alone: trivial ClientApp, FedAvg, 4-value array{kind[len('trivial') :]}", clients, rows)
    else:
        flower_round = {n: flower.get(n, {}) for n in clients}
        rows = [
            ("start-up s (process start -> round 1 begins)", of("startup_s"), f"<= {STARTUP_GOAL_S:g}"),
            (f"  start-up / {STARTUP_GOAL_S:g} s", of("startup_s", over=STARTUP_GOAL_S), "<= 1"),
            ("  imports done", of("to_imported_s", raw), ""),
            ("  server's model and data ready", of("to_experiment_ready_s", raw), ""),
            ("  min-train-nodes connected", of("to_nodes_connected_s", raw), ""),
            ("  initial model evaluated (round 0)", of("to_round0_evaluated_s", raw), ""),
            ("start-up s, with Ray's actors (round 1 end - a round)", of("startup_actors_s"), f"<= {STARTUP_GOAL_S:g}"),
            (f"  / {STARTUP_GOAL_S:g} s", of("startup_actors_s", over=STARTUP_GOAL_S), "<= 1"),
            ("round s (mean of rounds >= 2)", of("seconds"), "independent of N"),
            (f"  round / round at N={clients[0]}", of("seconds", over=base), "about 1"),
            ("  server's evaluation s", of("eval_seconds"), ""),
            ("  client s, max (client_seconds_max)", of("client_seconds_max"), ""),
            ("  training s, max (train_seconds_max)", of("train_seconds_max"), ""),
            ("  client s, sum over the sampled", of("client_seconds_sum"), ""),
            ("  training s, sum over the sampled", of("train_seconds_sum"), ""),
            ("  sampled nodes new to the run (set-up)", of("new_nodes"), ""),
            (f"  rest: round - eval - sum / {actors} actor(s)", of("rest_s"), ""),
            ("  Flower alone, round s (trivial work)", of("seconds", flower_round), ""),
            ("  driver process CPU s in the round", of("driver_cpu_s"), "competes with the actors"),
            ("round 1 s (builds the model in the actors)", of("round1_s"), ""),
            ("peak memory GiB, tree RSS", of("peak_rss_gib"), f"< {MEMORY_GOAL_GIB:g}"),
            (f"  peak RSS / {MEMORY_GOAL_GIB:g} GiB", of("peak_rss_gib", over=MEMORY_GOAL_GIB), "< 1"),
            ("  peak memory GiB, tree PSS", of("peak_pss_gib"), ""),
            ("wall s, whole process", of("wall_s"), ""),
        ]
        print_table(f"fedlora, {kind}", clients, rows)
    for n in clients:
        if n in by_n and not s[n]:
            print(f"  N={n}: {by_n[n]['status']}")
        elif s[n]:
            short = [
                r for r, v in sorted(by_n[n].get("rounds", {}).items()) if v.get("sampled") and v.get("replies") is not None and v["replies"] < v["sampled"]
            ]
            if short:
                print(f"  N={n}: round(s) {short} had fewer replies than nodes sampled (see the run's metrics.jsonl, failure_reasons)")


# -- main --------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A --set value as TOML reads it (3 -> int, 1e-5 -> float, true -> bool), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def data_overrides(data_dir: str | None, work: str, synthetic_train: int) -> tuple[dict[str, Any], str]:
    """SST-2 from ``data_dir`` if it holds sst2/, else the synthetic task written to files."""
    if data_dir and os.path.isdir(os.path.join(data_dir, "sst2")):
        path = os.path.join(os.path.abspath(data_dir), "sst2")
        return {"dataset": path, "eval-split": "validation"}, f"SST-2 ({path})"
    sys.path.insert(0, ROOT)
    from fedlora import synthetic

    folder = os.path.join(work, "synthetic")
    os.makedirs(folder, exist_ok=True)
    for split, rows in synthetic.make_splits(seed=1234, n_train=synthetic_train, n_eval=872).items():
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"dataset": folder, "eval-split": "validation"}, f"SYNTHETIC task, {synthetic_train} training sentences (no sst2/ in --data-dir)"


def machine() -> str:
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / GIB:.1f} GiB RAM"
        load = f", load {os.getloadavg()[0]:.2f}"
    except ImportError:
        mem, load = "", ""
    from importlib import metadata

    versions = []
    for pkg in ("flwr", "ray", "torch", "transformers", "opacus", "flwr-datasets"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}){mem}{load}; python {platform.python_version()}, " + ", ".join(versions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="10,100,1000", help="numbers of simulated nodes, comma-separated")
    ap.add_argument("--sampled", type=int, default=10, help="nodes sampled (training) per round")
    ap.add_argument("--rounds", type=int, default=3, help="server rounds (the round time is the mean of rounds >= 2)")
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epsilon", type=float, default=3.0, help="dp.epsilon (0 = no DP)")
    ap.add_argument("--dirichlet", action="store_true", help="also run Dirichlet partitions (partition.alpha = --alpha)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--data-dir", default=os.environ.get("FEDLORA_DATA_DIR"), help="folder with sst2/ (else the synthetic task)")
    ap.add_argument("--synthetic-train", type=int, default=SST2_TRAIN, help="training sentences of the synthetic stand-in")
    ap.add_argument("--model", default=None, help="model name or local folder (default: the run default, MiniLM)")
    ap.add_argument("--eval-examples", type=int, default=256, help="eval.max-examples: the server's evaluation set per round (0 = all)")
    ap.add_argument("--cpus-per-client", type=int, default=2, help="CPUs per Ray actor (fedlora.simulation's default: 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another run-config value for the fedlora runs")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds after which one run is killed")
    ap.add_argument("--skip-trivial", action="store_true", help="skip Flower alone")
    ap.add_argument("--skip-fedlora", action="store_true", help="skip fedlora's runs")
    ap.add_argument(
        "--polling",
        choices=("lean", "flower", "both"),
        default="lean",
        help="the loop that hands messages to the nodes: fedlora's (lean), Flower's, or both side by side",
    )
    ap.add_argument("--json", help="also write every measurement to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, run folders)")
    ap.add_argument("--child", choices=("trivial", "fedlora", "warm"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with open(args.spec) as f:
            spec = json.load(f)
        {"trivial": child_trivial, "fedlora": child_fedlora, "warm": child_warm}[args.child](spec)
        return

    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1:
        ap.error("--clients needs positive numbers")
    cpus = os.cpu_count() or 1
    actors = max(1, cpus // min(args.cpus_per_client, cpus))
    # A short path: Ray's socket paths must fit 107 characters.
    work = tempfile.mkdtemp(prefix="fls-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        data, data_desc = data_overrides(args.data_dir, work, args.synthetic_train) if not args.skip_fedlora else ({}, "-")
        base = {
            **data,
            "num-server-rounds": args.rounds,
            "local-steps": args.local_steps,
            "batch-size": args.batch_size,
            "dp.epsilon": args.epsilon,
            "eval.max-examples": args.eval_examples,
            **({"model": args.model} if args.model else {}),
            **{k.strip(): parse_value(v.strip()) for k, _, v in (s.partition("=") for s in args.set)},
        }
        kinds = ([] if args.skip_trivial else ["trivial"]) + ([] if args.skip_fedlora else ["iid"] + (["dirichlet"] if args.dirichlet else []))
        loops = {"lean": [False], "flower": [True], "both": [False, True]}[args.polling]
        # Each kind with each loop, one after the other at each N, so that the two are measured alike.
        runs = [(kind, flower_polling) for kind in kinds for flower_polling in loops]
        print(f"machine: {machine()}")
        print(f"Ray: {actors} actor(s) of {min(args.cpus_per_client, cpus)} CPU(s); {args.sampled} nodes sampled per round, {args.rounds} rounds")
        if not args.skip_fedlora:
            print(f"fedlora: {json.dumps(base)}")
            print(f"data: {data_desc}")
        print(f"work folder: {work}", flush=True)
        datasets_cache = os.path.join(work, "hf-datasets")
        if not args.skip_fedlora:
            print("reading the dataset once (the datasets cache) ...", flush=True)
            warm = launch("warm", {"overrides": base, "datasets_cache": datasets_cache}, os.path.join(work, "warm"), args.timeout)
            if warm["status"] != "done":
                sys.exit(1)
        results: dict[str, dict[int, dict[str, Any]]] = {kind + (FLOWER_POLLING if fp else ""): {} for kind, fp in runs}
        for n in clients:
            for kind, flower_polling in runs:
                label = kind + (FLOWER_POLLING if flower_polling else "")
                spec: dict[str, Any] = {
                    "flower_polling": flower_polling,
                    "nodes": n,
                    "sampled": args.sampled,
                    "rounds": args.rounds,
                    "cpus_per_client": args.cpus_per_client,
                    "datasets_cache": datasets_cache,
                }
                if kind != "trivial":
                    folder = os.path.join(work, f"{kind[0]}{n}{'f' if flower_polling else ''}")
                    spec["overrides"] = {
                        **base,
                        "fraction-train": min(1.0, args.sampled / n),
                        "min-train-nodes": min(args.sampled, n),
                        "partition.method": kind,
                        **({"partition.alpha": args.alpha} if kind == "dirichlet" else {}),
                        "output-dir": os.path.join(folder, "out"),
                        "run-name": f"{kind}-{n}",
                        "cache-dir": os.path.join(folder, "cache"),
                    }
                else:
                    folder = os.path.join(work, f"t{n}{'f' if flower_polling else ''}")
                what = "Flower alone" if kind == "trivial" else "fedlora " + kind
                print(f"running {what}{FLOWER_POLLING if flower_polling else ''}, N={n} ...", flush=True)
                res = launch("trivial" if kind == "trivial" else "fedlora", spec, folder, args.timeout)
                results[label][n] = res
                print(
                    f"  {res['status']} in {res['wall_s']:.0f} s; start-up {_fmt(res.get('startup_s'), 1)} s, "
                    f"peak tree RSS {res['peak_rss_gib']:.2f} GiB ({res['peak_processes']} processes)",
                    flush=True,
                )
        report(clients, results, actors)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "config": base, "data": data_desc, "actors": actors, "results": results}, f, indent=2, default=str)
            print(f"\nwrote {args.json}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
