"""Round time at 10 and 1,000 nodes under ``flwr run .`` itself, with the ServerApp's
shortcut for idle nodes (``fedlora.simulation.skip_idle_nodes``) and without it.

    python benchmarks/flwr_run_scale.py [--data-dir DIR] [--clients 10,1000] [--rounds 8] [--dirichlet]

``benchmarks/scale.py`` measures fedlora's own simulation (``fedlora.simulation``), which
replaces Flower's polling loop before Flower starts it. ``flwr run .`` starts Flower's
loop itself; there the ServerApp can only make the LinkState cheap to poll. This runs
``scripts/flwr-sim.sh`` (``flwr run .`` with a local SuperLink, an isolated FLWR_HOME)
for each N twice, one after the other: as the app runs (shortcut on) and with
``FEDLORA_FLOWER_POLLING=1`` (Flower's polling untouched), with the settings of
``scale.py``'s fedlora runs (DP FFA-LoRA at epsilon 3, 10 nodes sampled per round, 2
local steps of 16, the server's evaluation on 256 examples, one Ray actor of 2 CPUs).
It prints the mean ``seconds`` of rounds >= 2 from each run's ``metrics.jsonl`` and the
ratios: N = max / N = min for each way (goal: about 1), and without / with the shortcut;
then the CPU seconds of the ``flwr-simulation`` process (Flower's loop and the ServerApp;
sampled every 0.5 s) over each whole run; then, for each run, its start-up (from launching
``flwr run`` until its log shows round 1 sampling its nodes, checked every 0.5 s: the local
SuperLink, the app's install, Ray, the ServerApp's model and data, round 0's evaluation), the
time outside its rounds (the ``flwr run`` wall time minus every round's ``seconds``: start-up
plus shut-down) and the peak memory of all its processes (the summed RSS, every
0.5 s, of each process whose environment holds the run's own FLWR_HOME: ``flwr run``, the
SuperLink it starts, ``flwr-simulation`` and Ray's processes; shared pages count once per
process, so this over-counts), beside ``scale.py``'s goals (start-up <= 30 s, < 6 GiB).
A run whose log does not show the shortcut where it should be (or shows it where it should
not) stops the benchmark.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import GIB, MEMORY_GOAL_GIB, ROOT, STARTUP_GOAL_S, _stat  # noqa: E402  (scale.py: the /proc reader, the repo root, the goals)

WAYS = (("shortcut", False), ("Flower's polling", True))
ROUND1_LINE = "configure_train: Sampled"  # Flower's strategy, as round 1 begins
SHORTCUT_LINE = "Flower's polling of idle nodes skips the message scan"  # the ServerApp's log line when installed


def run_once(nodes: int, flower_polling: bool, args: argparse.Namespace, work: str) -> dict:
    """One ``flwr run .`` of ``nodes`` nodes; the run's per-round seconds and its wall time."""
    name = f"{'f' if flower_polling else 's'}{nodes}"
    out = os.path.join(work, name)
    home = os.path.join(work, name + "-home")
    env = {**os.environ, "FLWR_HOME": home, "FEDLORA_NODES": str(nodes), "FEDLORA_CPUS_PER_CLIENT": str(args.cpus_per_client)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # this Python's flwr
    env.pop("FEDLORA_FLOWER_POLLING", None)
    if flower_polling:
        env["FEDLORA_FLOWER_POLLING"] = "1"
    if args.data_dir:
        env["FEDLORA_DATA_DIR"] = os.path.abspath(args.data_dir)
    sampled = min(args.sampled, nodes)
    config = {
        "num-server-rounds": args.rounds,
        "local-steps": 2,
        "batch-size": 16,
        "dp.epsilon": 3.0,
        "eval.max-examples": 256,
        "fraction-train": sampled / nodes,
        "min-train-nodes": sampled,
        "partition.method": "dirichlet" if args.dirichlet else "iid",
        "output-dir": out,
        "run-name": name,
        "cache-dir": os.path.join(work, name + "-cache"),
    }
    pairs = [f"{k}={json.dumps(v)}" for k, v in config.items()]
    log_path = os.path.join(work, name + ".log")
    started, cpu, memory, stop = time.monotonic(), {}, {"peak": 0, "processes": 0, "round1": None}, threading.Event()
    sampler = threading.Thread(target=_sample, args=(cpu, memory, f"FLWR_HOME={home}".encode(), log_path, started, stop), daemon=True)
    sampler.start()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "flwr-sim.sh"), *pairs], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
        )
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    rows = []
    for path in glob.glob(os.path.join(out, name + "*", "metrics.jsonl")):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    seconds = [r["seconds"] for r in rows if r.get("round", 0) >= 2 and "seconds" in r]
    in_rounds = sum(r["seconds"] for r in rows if r.get("round", 0) >= 1 and "seconds" in r)
    if proc.returncode != 0 or len(seconds) < args.rounds - 1:
        sys.exit(
            f"N={nodes} ({'Flower polling' if flower_polling else 'shortcut'}): the run failed (exit {proc.returncode}, {len(seconds)} rounds >= 2); see {log.name}"
        )
    with open(log.name) as f:
        installed = SHORTCUT_LINE in f.read()
    if installed == flower_polling:
        sys.exit(
            f"N={nodes}: the ServerApp's shortcut was {'installed' if installed else 'not installed'} where it should {'not ' if flower_polling else ''}be; see {log.name}"
        )
    return {
        "round": statistics.mean(seconds),
        "rounds": seconds,
        "wall": wall,
        "outside_rounds": wall - in_rounds,
        "startup": memory["round1"],
        "driver_cpu": sum(cpu.values()),
        "peak_gib": memory["peak"] / GIB,
        "processes": memory["processes"],
    }


def _sample(cpu: dict[int, float], memory: dict, marker: bytes, log_path: str, started: float, stop: threading.Event) -> None:
    """Every 0.5 s: the seconds from ``started`` until the run's log first shows round 1
    sampling its nodes (``ROUND1_LINE``: the start-up, to within 0.5 s), the CPU seconds (user + system) so far of each ``flwr-simulation``
    process (the SuperLink's simulation process, where Flower's loop polls the nodes and
    the ServerApp runs; the ClientApps run in Ray's actor processes), and the summed RSS
    of every process whose environment holds ``marker`` (this run's FLWR_HOME), with its
    peak and the most such processes seen at once."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    while not stop.wait(0.5):
        rss = procs = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{pid}/statm") as f:
                    rss += int(f.read().split()[1]) * page
                procs += 1
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if not any(arg.endswith(b"flwr-simulation") for arg in f.read().split(b"\0")[:2]):  # [python, script]
                        continue
            except (OSError, ValueError, IndexError):  # gone meanwhile, or another user's
                continue
            if (fields := _stat(int(pid))) is None:
                continue
            cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        memory["peak"], memory["processes"] = max(memory["peak"], rss), max(memory["processes"], procs)
        if memory["round1"] is None:
            try:
                with open(log_path, errors="replace") as f:
                    if ROUND1_LINE in f.read():
                        memory["round1"] = time.monotonic() - started
            except OSError:  # not created yet
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("FEDLORA_DATA_DIR"), help="folder with sst2/ (else the built-in synthetic task)")
    ap.add_argument("--clients", default="10,1000", help="comma-separated numbers of simulated nodes")
    ap.add_argument(
        "--rounds", type=int, default=8, help="rounds per run (rounds >= 2 are averaged; with 4, rounds scattered too much to separate the two ways)"
    )
    ap.add_argument("--sampled", type=int, default=10, help="nodes trained per round")
    ap.add_argument("--cpus-per-client", type=int, default=2, help="CPUs per Ray actor (Flower's client-resources-num-cpus)")
    ap.add_argument("--dirichlet", action="store_true", help="Dirichlet(0.5) partitions instead of IID")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 builds the nodes and is not averaged)")
    clients = [int(c) for c in args.clients.split(",")]
    work = tempfile.mkdtemp(prefix="flrs-", dir="/tmp" if os.path.isdir("/tmp") else None)  # Ray's socket paths must stay short
    print(
        f"CPUs: {os.cpu_count()}; {args.sampled} nodes sampled per round, {args.rounds} rounds, {'Dirichlet(0.5)' if args.dirichlet else 'IID'}; work folder {work}",
        flush=True,
    )
    results: dict[tuple[str, int], dict] = {}
    for n in clients:
        for way, flower_polling in WAYS:  # both ways one after the other at each N, so that they are measured alike
            print(f"running N={n}, {way} ...", flush=True)
            results[way, n] = r = run_once(n, flower_polling, args, work)
            print(f"  rounds >= 2: {', '.join(f'{s:.2f}' for s in r['rounds'])} s; flwr run took {r['wall']:.0f} s", flush=True)
    lo, hi = min(clients), max(clients)
    print("\n| round s, rounds >= 2 | " + " | ".join(f"N = {n:,}" for n in clients) + f" | N = {hi:,} / N = {lo:,} |")
    print("|---|" + "---|" * (len(clients) + 1))
    for way, _ in WAYS:
        print(
            f"| {way} | "
            + " | ".join(f"{results[way, n]['round']:.2f}" for n in clients)
            + f" | ×{results[way, hi]['round'] / results[way, lo]['round']:.2f} |"
        )
    print(
        "| Flower's polling / shortcut | " + " | ".join(f"×{results[WAYS[1][0], n]['round'] / results[WAYS[0][0], n]['round']:.2f}" for n in clients) + " | |"
    )

    print("\n| flwr-simulation process: CPU s / wall s of the whole run | " + " | ".join(f"N = {n:,}" for n in clients) + " |")
    print("|---|" + "---|" * len(clients))
    for way, _ in WAYS:
        print(f"| {way} | " + " | ".join(f"{results[way, n]['driver_cpu']:.1f} / {results[way, n]['wall']:.0f}" for n in clients) + " |")

    print("\n| the run's processes | " + " | ".join(f"N = {n:,}" for n in clients) + " | goal (scale.py) |\n|---|" + "---|" * (len(clients) + 1))
    for way, _ in WAYS:
        cells = {
            "start-up s (flwr run -> round 1 samples)": (
                [f"{results[way, n]['startup']:.1f}" if results[way, n]["startup"] is not None else "not seen" for n in clients],
                f"<= {STARTUP_GOAL_S:g}",
            ),
            "s outside rounds (start-up + shut-down)": ([f"{results[way, n]['outside_rounds']:.1f}" for n in clients], "reported"),
            "peak GiB, summed RSS (processes)": (
                [f"{results[way, n]['peak_gib']:.2f} ({results[way, n]['processes']})" for n in clients],
                f"< {MEMORY_GOAL_GIB:g}",
            ),
        }
        for what, (values, goal) in cells.items():
            print(f"| {way}: {what} | " + " | ".join(values) + f" | {goal} |")


if __name__ == "__main__":
    main()
