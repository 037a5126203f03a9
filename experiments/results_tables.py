"""Print the Markdown tables of docs/RESULTS.md from the committed run folders.

    python experiments/results_tables.py            # after (or during) the grids
    fedlora report experiments/results/sst2         # the same runs as plots

Every number comes from the runs' metrics.jsonl / config.json under
experiments/results/; incomplete runs are left out and counted.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

from fedlora.tools.report import Run, find_runs, mean_std

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STRATEGIES = ("lora", "ffa-lora")


def _complete(name: str) -> tuple[list[Run], int]:
    runs = find_runs([os.path.join(ROOT, name)]) if os.path.isdir(os.path.join(ROOT, name)) else []
    done = [r for r in runs if r.complete]
    return done, len(runs) - len(done)


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={len(values)})" if len(values) > 1 else f"{m:.{digits}f} (n=1)"


def _evaluated(rows: list[dict]) -> list[dict]:
    """The rounds the server evaluated (``eval.every`` skips some)."""
    return [x for x in rows if x.get("accuracy") is not None]


def _curve(rows: list[dict]) -> str:
    return " → ".join(f"{x['accuracy']:.3f}" for x in _evaluated(rows))


def _best(rows: list[dict]) -> dict:
    """The evaluated round with the highest accuracy after round 0."""
    return max(_evaluated(rows[1:]), key=lambda x: x["accuracy"])


def _eps(e: float) -> str:
    return "non-private" if not e else f"{e:g}"


def _by(runs: list[Run], *keys: str) -> dict[tuple, list[Run]]:
    out: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        out[tuple(r.config.get(k) for k in keys)].append(r)
    return out


def _wall(name: str) -> str:
    path = os.path.join(ROOT, name, "grid-log.jsonl")
    if not os.path.exists(path):
        return "no grid log"
    rows = [json.loads(line) for line in open(path)]
    done = [r for r in rows if r["status"] == "done"]
    return f"{sum(r['wall_seconds'] for r in rows) / 60:.0f} min of wall time over {len(rows)} subprocess runs ({len(done)} completed)"


def sweep() -> None:
    runs, partial = _complete("sst2-sweep")
    print("### Sweep: learning rate, and rounds x local steps (SST-2, IID, seed 0)\n")
    print("| ε | strategy | learning rate | rounds × local steps | accuracy by round (0 = initial) | final | ε spent |\n|---|---|---|---|---|---|---|")

    def schedule(r: Run) -> tuple[int, int]:
        return r.config.get("num-server-rounds", 4), r.config.get("local-steps", 10)

    for r in sorted(runs, key=lambda r: (-r.config.get("dp.epsilon", 3.0), r.config["strategy"], r.config["learning-rate"], schedule(r))):
        curve = _curve(r.rows)
        print(
            f"| {_eps(r.config.get('dp.epsilon', 3.0))} | {r.config['strategy']} | {r.config['learning-rate']:g} | "
            f"{'{} × {}'.format(*schedule(r))} | {curve} | **{r.final['accuracy']:.4f}** | {r.final['epsilon']:.3f} |"
        )
    print(f"\n{len(runs)} runs complete, {partial} incomplete; {_wall('sst2-sweep')}.\n")


def _run_minutes(name: str) -> dict[str, float]:
    """Each run's wall time (minutes, summed over its subprocess runs) from a grid's log."""
    path = os.path.join(ROOT, name, "grid-log.jsonl")
    out: dict[str, float] = defaultdict(float)
    if os.path.exists(path):
        for row in map(json.loads, open(path)):
            out[row["run"]] += row["wall_seconds"] / 60
    return out


def _clipping(r: Run) -> str:
    c = r.config.get("dp.clipping", "flat")
    return f"{c}, C = {r.config.get('dp.max-grad-norm', 1.0):g}" + (f", head share {r.config.get('dp.head-share', 0.5):g}" if c == "per-group" else "")


def recipe() -> None:
    runs, partial = _complete("sst2-recipe")
    minutes = _run_minutes("sst2-recipe")
    print("### DP recipe sweep: large Poisson batches, clipping, learning rate (SST-2, IID, seed 0)\n")
    print("| ε | strategy | clipping | learning rate | rounds × steps × batch | accuracy by round (0 = initial) | final | ε spent | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(runs, key=lambda r: (-r.config.get("dp.epsilon", 3.0), r.config["strategy"], _clipping(r), r.config["learning-rate"])):
        c = r.config
        curve = _curve(r.rows)
        shape = f"{c['num-server-rounds']} × {c['local-steps']} × {c['batch-size']}"
        print(
            f"| {_eps(c.get('dp.epsilon', 3.0))} | {c['strategy']} | {_clipping(r) if c.get('dp.epsilon', 3.0) else '–'} | {c['learning-rate']:g} | {shape} | "
            f"{curve} | **{r.final['accuracy']:.4f}** | {r.final['epsilon']:.3f} | {minutes.get(os.path.basename(r.path), 0):.1f} |"
        )
    print(f"\n{len(runs)} runs complete, {partial} incomplete; {_wall('sst2-recipe')}.\n")


DP_STRATEGIES = ("lora", "ffa-lora", "fedsvd")


def dp_grid() -> None:
    """experiments/sst2-dp.toml: the comparison with the DP recipe, and what is still missing."""
    from fedlora.tools import compare

    name = "sst2-dp"
    runs, partial = _complete(name)
    minutes = _run_minutes(name)
    groups = _by(runs, "partition.method", "dp.epsilon", "strategy")
    for split in ("iid", "dirichlet"):
        label = "IID" if split == "iid" else "Dirichlet(0.5) label skew"
        print(f"### With the DP recipe: SST-2, 3 clients, {label}; final accuracy, mean ± std over seeds\n")
        print("| ε | LoRA | FFA-LoRA | FedSVD |\n|---|---|---|---|")
        for eps in (0.0, 3.0, 1.0):
            cells = [_fmt([r.final["accuracy"] for r in groups.get((split, eps, s), [])]) for s in DP_STRATEGIES]
            print(f"| {_eps(eps)} | " + " | ".join(cells) + " |")
        print()
    if runs:
        print("Accuracy by round (seed 0):\n")
        _by_round([r for r in runs if r.config.get("seed") == 0], minutes)
    grid = compare.load_grid(os.path.join(os.path.dirname(ROOT), f"{name}.toml"))
    done = {os.path.basename(r.path) for r in runs}
    missing = [spec.name for spec in compare.expand(grid) if spec.name not in done]
    print(f"{len(runs)} of {len(runs) + len(missing)} runs complete ({partial} started, not complete); {_wall(name)}.")
    if missing:
        print(f"Not yet run: {len(missing)} runs, the first being {missing[0]} (`fedlora compare experiments/{name}.toml` continues the grid).")
    print()


def _by_round(runs: list[Run], minutes: dict[str, float]) -> None:
    print("| split | ε | strategy | learning rate | rounds × steps × batch | accuracy by round (0 = initial) | ε spent | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(runs, key=lambda r: (r.config["partition.method"], -r.config["dp.epsilon"] or 9, r.config["strategy"])):
        c = r.config
        curve = _curve(r.rows)
        shape = f"{c['num-server-rounds']} × {c['local-steps']} × {c['batch-size']}"
        print(
            f"| {c['partition.method']} | {_eps(c['dp.epsilon'])} | {c['strategy']} | {c['learning-rate']:g} | {shape} | {curve} | "
            f"{r.final['epsilon']:.3f} | {minutes.get(os.path.basename(r.path), 0):.1f} |"
        )
    print()


def dp_rates() -> None:
    """experiments/sst2-dp-rates.toml: the first recipe runs at one rate for every method, superseded."""
    name = "sst2-dp-rates"
    runs, partial = _complete(name)
    print("### The recipe at one learning rate for all (AdamW 0.02; superseded by sst2-dp.toml's rate per method)\n")
    _by_round(runs, _run_minutes(name))
    print(f"{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def dp_rounds() -> None:
    """experiments/sst2-dp-rounds.toml and sst2-dp-long.toml: the recipe with 10 and 24 rounds
    instead of 6 (FFA-LoRA, epsilon 3; the 24-round grid also has its non-private reference)."""
    for name, rounds, what in (("sst2-dp-rounds", 10, "ε = 3"), ("sst2-dp-long", 24, "ε = 3 and its non-private reference")):
        runs, partial = _complete(name)
        print(f"### The recipe with {rounds} rounds instead of 6 (FFA-LoRA, {what}, seed 0; `experiments/{name}.toml`)\n")
        if runs:
            _by_round(runs, _run_minutes(name))
        print(f"{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def dp_dropout() -> None:
    """experiments/sst2-dp-dropout.toml: the recipe with MiniLM's dropout off, beside the same
    seed-0 epsilon-3 cells of sst2-dp.toml (dropout 0.1, the checkpoint's)."""
    name = "sst2-dp-dropout"
    runs, partial = _complete(name)
    print("### The recipe with the model's dropout off (`model-dropout = 0`; ε = 3, seed 0; `experiments/sst2-dp-dropout.toml`)\n")
    if runs:
        with_dropout = _by(_complete("sst2-dp")[0], "partition.method", "dp.epsilon", "strategy", "seed")
        minutes = _run_minutes(name)
        print("| split | strategy | final, dropout 0.1 | final, dropout 0 | minutes, dropout 0 |\n|---|---|---|---|---|")
        for r in sorted(runs, key=lambda r: (r.config["partition.method"], r.config["strategy"])):
            c = r.config
            same = with_dropout.get((c["partition.method"], c["dp.epsilon"], c["strategy"], c["seed"]), [])
            before = f"{same[0].final['accuracy']:.3f}" if same else "–"
            print(f"| {c['partition.method']} | {c['strategy']} | {before} | {r.final['accuracy']:.3f} | {minutes.get(os.path.basename(r.path), 0):.1f} |")
        print()
        _by_round(runs, minutes)
    print(f"{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def dp_goal() -> None:
    """experiments/sst2-dp-goal.toml: the issue's goal with as many rounds as fit 20 minutes,
    dropout off, epsilon 3 and the non-private references of the same length."""
    name = "sst2-dp-goal"
    runs, partial = _complete(name)
    print(f"### Aiming at the goal: as many rounds as fit 20 minutes, dropout off (ε = 3 and non-private, seed 0; `experiments/{name}.toml`)\n")
    if runs:
        minutes = _run_minutes(name)
        _by_round(runs, minutes)
        for split, goal in (("iid", 0.84), ("dirichlet", 0.80)):
            dp = [r for r in runs if r.config["partition.method"] == split and r.config["dp.epsilon"]]
            if dp:
                best = max(dp, key=lambda r: r.final["accuracy"])
                mins = minutes.get(os.path.basename(best.path), 0)
                ok = best.final["accuracy"] >= goal and mins <= 20
                print(
                    f"- {split}: best ε = 3 run {best.config['strategy']} {best.final['accuracy']:.3f} in {mins:.1f} min "
                    f"(goal ≥ {goal:.2f} in ≤ 20 min: {'reached' if ok else 'not reached'})"
                )
        print()
    print(f"{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def _run_table(name: str, title: str) -> None:
    """One row per run of a grid whose runs differ in several settings: each run's curve,
    final and best accuracy, epsilon and minutes."""
    runs, partial = _complete(name)
    print(f"### {title} (`experiments/{name}.toml`)\n")
    if runs:
        minutes = _run_minutes(name)
        print(
            "| split | ε | strategy | schedule | seed | max-length | precision | rounds × steps × batch | accuracy by round (0 = initial) | final | best (round) | ε spent | minutes |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

        def key(r: Run) -> tuple:
            c = r.config
            return c["partition.method"] != "iid", c["strategy"], -c["dp.epsilon"] or 9, c["lr-schedule"], c["max-length"], c["precision"], c["seed"]

        for r in sorted(runs, key=key):
            c = r.config
            curve = _curve(r.rows)
            best = _best(r.rows)
            print(
                f"| {c['partition.method']} | {_eps(c['dp.epsilon'])} | {c['strategy']} | {c['lr-schedule']} {c['learning-rate']:g} | {c['seed']} | "
                f"{c['max-length']} | {c['precision']} | {c['num-server-rounds']} × {c['local-steps']} × {c['batch-size']} | {curve} | {r.final['accuracy']:.3f} | "
                f"{best['accuracy']:.3f} ({best['round']}) | {r.final['epsilon']:.3f} | {minutes.get(os.path.basename(r.path), 0):.1f} |"
            )
        print()
    print(f"{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def dp_schedule() -> None:
    """experiments/sst2-dp-schedule.toml: the goal runs with a cosine learning-rate decay, their
    shape without noise, and more seeds of the Dirichlet FFA-LoRA run that met its goal."""
    _run_table("sst2-dp-schedule", "A decaying learning rate, the goal's shape without noise, more Dirichlet seeds")


def dp_reach() -> None:
    """experiments/sst2-dp-reach.toml: the best IID run with whole validation sentences (max-length 64),
    its noiseless twin, its frozen base in bfloat16, and more seeds."""
    _run_table("sst2-dp-reach", "Whole sentences: max-length 64 instead of 32, without noise, in bf16, with batches of 1024, more seeds")


def dp_ema() -> None:
    """experiments/sst2-dp-ema.toml: the reach base evaluated also as a moving average over rounds."""
    runs, partial = _complete("sst2-dp-ema")
    name = "sst2-dp-ema"
    print(f"### The same run, evaluated also as a moving average over rounds (`experiments/{name}.toml`)\n")
    if runs:
        minutes = _run_minutes(name)
        print(
            "| seed | ema-decay | accuracy by round: the round's model | its moving average | final: model / average | best (round): model / average | ε spent | minutes |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in sorted(runs, key=lambda r: r.config["seed"]):
            c, rows = r.config, r.rows[1:]
            curve = _curve(rows)
            ema = " → ".join(f"{x['ema_accuracy']:.3f}" for x in rows)
            best = max(rows, key=lambda x: x["accuracy"])
            best_ema = max(rows, key=lambda x: x["ema_accuracy"])
            print(
                f"| {c['seed']} | {c['eval.ema-decay']:g} | {curve} | {ema} | {rows[-1]['accuracy']:.3f} / {rows[-1]['ema_accuracy']:.3f} | "
                f"{best['accuracy']:.3f} ({best['round']}) / {best_ema['ema_accuracy']:.3f} ({best_ema['round']}) | {r.final['epsilon']:.3f} | "
                f"{minutes.get(os.path.basename(r.path), 0):.1f} |"
            )
        print()
    print(f"{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def _reach_base_at(runs: list[Run]) -> list[Run]:
    """The reach base's DP runs (batch 512, float32) at the seeds of ``runs``, to print beside them."""
    seeds = {r.config["seed"] for r in runs}
    reach = _complete("sst2-dp-reach")[0]
    return [r for r in reach if r.config["dp.epsilon"] == 3 and r.config["batch-size"] == 512 and r.config["precision"] == "fp32" and r.config["seed"] in seeds]


def _sigmas(r: Run) -> str:
    """The noise multipliers a run's clients reported, "/"-joined (one per distinct value), or "–"."""
    sigmas = {m["noise-multiplier"] for x in r.rows for m in x.get("client_metrics", {}).values() if "noise-multiplier" in m}
    return "/".join(f"{v:.3f}" for v in sorted(sigmas)) or "–"


def _outcome(r: Run, minutes: dict[str, float]) -> str:
    """A run's table cells: its curve, final and best accuracy, epsilon spent and minutes."""
    curve = _curve(r.rows)
    best = _best(r.rows)
    return f"{curve} | {r.final['accuracy']:.3f} | {best['accuracy']:.3f} ({best['round']}) | {r.final['epsilon']:.3f} | {minutes.get(os.path.basename(r.path), 0):.1f}"


def dp_share() -> None:
    """experiments/sst2-dp-share.toml: the reach base with less of the clipping norm for the head,
    beside the reach base itself (head share 0.5, same seed)."""
    name = "sst2-dp-share"
    runs, partial = _complete(name)
    print(f"### Less of the clipping norm for the head (`experiments/{name}.toml`, beside the reach base)\n")
    if runs:
        minutes = {**_run_minutes("sst2-dp-reach"), **_run_minutes(name)}
        base = _reach_base_at(runs)
        print("| head-share | head / adapter clipping norm | seed | accuracy by round (0 = initial) | final | best (round) | ε spent | minutes |")
        print("|---|---|---|---|---|---|---|---|")
        for r in sorted(base + runs, key=lambda r: (-r.config["dp.head-share"], r.config["seed"])):
            c = r.config
            share, norm = c["dp.head-share"], c["dp.max-grad-norm"]
            print(
                f"| {share:g}{' (reach base)' if r in base else ''} | {norm * share**0.5:.3f} / {norm * (1 - share) ** 0.5:.3f} | {c['seed']} | {_outcome(r, minutes)} |"
            )
        print()
    print(f"{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def dp_layers() -> None:
    """experiments/sst2-dp-layers.toml: the reach base with LoRA in the top blocks only, and with the
    PRV accountant, beside the reach base itself (every block, RDP) at the same seeds."""
    name = "sst2-dp-layers"
    runs, partial = _complete(name)
    print(f"### LoRA in the top blocks only, and the PRV accountant (`experiments/{name}.toml`, beside the reach base)\n")
    if runs:
        minutes = {**_run_minutes("sst2-dp-reach"), **_run_minutes(name)}
        base = _reach_base_at(runs)
        print("| split | ε | blocks with LoRA | accountant | σ | seed | accuracy by round (0 = initial) | final | best (round) | ε spent | minutes |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")

        def key(r: Run) -> tuple:
            c = r.config
            return (
                c["partition.method"] != "iid",
                -c["dp.epsilon"] or 9,
                c.get("lora.layers", ""),
                c.get("dp.accountant", "rdp"),
                c["seed"],
                c.get("eval.every", 1),
            )

        for r in sorted(base + runs, key=key):
            c = r.config
            sigma = _sigmas(r)
            blocks = c.get("lora.layers") or "all"
            every = f" (evaluated at rounds 0, {c['eval.every']}, {2 * c['eval.every']} …)" if c.get("eval.every", 1) > 1 else ""
            print(
                f"| {c['partition.method']} | {_eps(c['dp.epsilon'])} | {blocks}{' (reach base)' if r in base else ''} | {c.get('dp.accountant', 'rdp') if c['dp.epsilon'] else '–'} | {sigma} | "
                f"{c['seed']}{every} | {_outcome(r, minutes)} |"
            )
        print()
    print(f"{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def _beside_layers(name: str, title: str, beside: str, pick, columns: list[str], cells, key) -> None:
    """A grid's section whose runs are set beside some of sst2-dp-layers.toml's (``pick``):
    the columns ``cells(run)`` fills, then seed, curve, final, best, epsilon and minutes."""
    runs, partial = _complete(name)
    print(f"### {title} (`experiments/{name}.toml`, beside sst2-dp-layers.toml's {beside})\n")
    if runs:
        minutes = {**_run_minutes("sst2-dp-layers"), **_run_minutes(name)}
        rows = [r for r in _complete("sst2-dp-layers")[0] if pick(r)] + runs
        print(f"| {' | '.join(columns)} | seed | accuracy by round (0 = initial) | final | best (round) | ε spent | minutes |")
        print("|---" * (len(columns) + 6) + "|")
        for r in sorted(rows, key=lambda r: key(r, r in runs)):
            print(f"| {cells(r)} | {r.config['seed']} | {_outcome(r, minutes)} |")
        print()
    print(f"{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def _top3_seed0(r: Run) -> bool:
    """sst2-dp-layers.toml's IID seed-0 runs of the top-three-block shape that the later grids
    vary: its noiseless twin and its PRV runs (evaluated every round, and every fifth)."""
    c = r.config
    return (
        c["seed"] == 0 and c["partition.method"] == "iid" and c.get("lora.layers") == "-3,-2,-1" and (c["dp.epsilon"] == 0 or c.get("dp.accountant") == "prv")
    )


def dp_targets() -> None:
    """experiments/sst2-dp-targets.toml: every linear layer of the top three blocks adapted,
    beside the query/value runs of the same shape in sst2-dp-layers.toml (seed 0, IID: the
    noiseless twin and the PRV run evaluated every round)."""

    def cells(r: Run) -> str:
        c = r.config
        up = r.rows[1]["bytes_up"] / r.rows[1]["clients"]  # the same every round: the trained values sent
        return f"{_eps(c['dp.epsilon'])} | {c.get('lora.target-modules') or 'query,value'} | {up / 1000:.1f} kB"

    _beside_layers(
        "sst2-dp-targets",
        "Every linear layer of the top three blocks",
        "query and value",
        lambda r: _top3_seed0(r) and r.config.get("eval.every", 1) == 1,
        ["ε", "adapted layers (top three blocks)", "upload per client and round"],
        cells,
        lambda r, new: (-r.config["dp.epsilon"] or 9, new),
    )


def dp_steps() -> None:
    """experiments/sst2-dp-steps.toml: the top-three-block PRV shape with the same examples per
    round in 8 steps of 256 instead of 4 of 512, beside the 4 x 512 runs of sst2-dp-layers.toml
    (seed 0, IID: the noiseless twin and the PRV run evaluated every fifth round)."""

    def cells(r: Run) -> str:
        c = r.config
        return f"{_eps(c['dp.epsilon'])} | {c['num-server-rounds']} × {c['local-steps']} × {c['batch-size']} | {c['learning-rate']:g} | {_sigmas(r)}"

    _beside_layers(
        "sst2-dp-steps",
        "More, smaller steps: 8 of 256 instead of 4 of 512",
        "4 × 512",
        lambda r: _top3_seed0(r) and (r.config["dp.epsilon"] == 0 or r.config.get("eval.every", 1) == 5),
        ["ε", "rounds × steps × batch", "learning rate", "σ"],
        cells,
        lambda r, new: (-r.config["dp.epsilon"] or 9, -r.config["batch-size"], -r.config["learning-rate"]),
    )


def goal_cells() -> None:
    """Issue 13's goal (epsilon 3, at most 20 minutes a run): the best shape of each split over its
    three seeds, beside its noiseless twin where one was run. IID: sst2-dp-layers.toml's top three
    blocks with PRV, evaluated every round; Dirichlet(0.5): sst2-dp-schedule.toml's 24 rounds with
    the cosine decay."""
    print("### The goal's cells over three seeds (ε = 3; goal: IID ≥ 0.84, Dirichlet(0.5) ≥ 0.80, ≤ 20 minutes a run)\n")
    layers, schedule = _complete("sst2-dp-layers")[0], _complete("sst2-dp-schedule")[0]
    minutes = {**_run_minutes("sst2-dp-layers"), **_run_minutes("sst2-dp-schedule")}

    def top3(r: Run) -> bool:
        c = r.config
        return c.get("lora.layers") == "-3,-2,-1" and c["partition.method"] == "iid" and c.get("eval.every", 1) == 1 and c["strategy"] == "ffa-lora"

    cells = [
        (
            "iid",
            "40 × 4 × 512, top three blocks, PRV",
            "sst2-dp-layers",
            [r for r in layers if top3(r) and r.config.get("dp.accountant") == "prv"],
            [r for r in layers if top3(r) and r.config["dp.epsilon"] == 0],
            0.84,
        ),
        (
            "dirichlet",
            "24 × 4 × 512, cosine decay",
            "sst2-dp-schedule",
            [
                r
                for r in schedule
                if r.config["partition.method"] == "dirichlet"
                and r.config.get("lr-schedule") == "cosine"
                and r.config["dp.epsilon"] == 3
                and r.config["strategy"] == "ffa-lora"
            ],
            [],
            0.80,
        ),
    ]
    print("| split | FFA-LoRA shape | grid | final by seed | mean ± std | minutes by seed | noiseless twin (seed 0) | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for split, shape, grid, runs, twin, goal in cells:
        runs = sorted(runs, key=lambda r: r.config["seed"])
        finals = [r.final["accuracy"] for r in runs]
        if not finals:
            continue
        mean = mean_std(finals)[0]
        by_seed = ", ".join(f"{r.config['seed']}: {r.final['accuracy']:.3f}" for r in runs)
        took = ", ".join(f"{minutes.get(os.path.basename(r.path), 0):.1f}" for r in runs)
        ceiling = f"{twin[0].final['accuracy']:.3f}" if twin else "–"
        print(
            f"| {split} | {shape} | {grid} | {by_seed} | {_fmt(finals)} | {took} | {ceiling} | ≥ {goal:.2f}: {'reached' if mean >= goal else 'not reached'} on average |"
        )
    print("\nMinutes are wall time; runs that shared the 2 CPUs with other work took longer (docs/RESULTS.md says which).\n")


def main_grid() -> None:
    runs, partial = _complete("sst2")
    reference, ref_partial = _complete("sst2-nonprivate")  # the non-private row: its own grid and rates
    runs, partial = runs + reference, partial + ref_partial
    groups = _by(runs, "partition.method", "dp.epsilon", "strategy")
    for split in ("iid", "dirichlet"):
        label = "IID" if split == "iid" else "Dirichlet(0.5) label skew"
        print(f"### SST-2, 3 clients, {label}: final accuracy, mean ± std over seeds\n")
        print("| ε | LoRA | FFA-LoRA | FFA − LoRA |\n|---|---|---|---|")
        for eps in (0.0, 6.0, 3.0, 1.0):
            cells = {s: [r.final["accuracy"] for r in groups.get((split, eps, s), [])] for s in STRATEGIES}
            diff = "–"
            if cells["lora"] and cells["ffa-lora"]:
                diff = f"{mean_std(cells['ffa-lora'])[0] - mean_std(cells['lora'])[0]:+.3f}"
            print(f"| {_eps(eps)} | {_fmt(cells['lora'])} | {_fmt(cells['ffa-lora'])} | {diff} |")
        print()
    print(f"{len(runs)} runs complete, {partial} incomplete; sst2: {_wall('sst2')}; sst2-nonprivate: {_wall('sst2-nonprivate')}.\n")


def communication(target: float) -> None:
    runs = _complete("sst2")[0] + _complete("sst2-nonprivate")[0]
    print(f"### Communication (SST-2, IID; target accuracy {target:.2f})\n")
    print("| strategy | ε | upload per client per round | upload per round (all clients) | rounds to target | uploaded to reach target |")
    print("|---|---|---|---|---|---|")
    for (eps, strategy), reps in sorted(_by([r for r in runs if r.config["partition.method"] == "iid"], "dp.epsilon", "strategy").items()):
        per_round = reps[0].rows[1]["bytes_up"]
        clients = reps[0].rows[1]["clients"]
        reached = []
        for r in reps:
            hit = next((x for x in _evaluated(r.rows) if x["accuracy"] >= target), None)
            reached.append((hit["round"], hit["cum_bytes_up"]) if hit else None)
        got = [x for x in reached if x]
        rounds = f"{mean_std([x[0] for x in got])[0]:.1f} ({len(got)}/{len(reached)} seeds)" if got else f"not reached (0/{len(reached)})"
        upload = f"{mean_std([x[1] for x in got])[0] / 1e6:.2f} MB" if got else "–"
        print(f"| {strategy} | {_eps(eps)} | {per_round / clients / 1e3:.1f} kB | {per_round / 1e6:.3f} MB | {rounds} | {upload} |")
    print()


def _seed0_iid_eps3(name: str) -> list[Run]:
    """A grid's seed-0, IID, epsilon-3 runs at alpha 16: the alpha grids' alpha = 16 cells."""
    return [
        r
        for r in _complete(name)[0]
        if r.config.get("seed") == 0 and r.config.get("partition.method") == "iid" and r.config.get("dp.epsilon") == 3.0 and r.config.get("lora.alpha") == 16
    ]


def _alpha_table(title: str, name: str, reference: list[Run], strategies: tuple[str, ...], show_rate: bool) -> None:
    runs, partial = _complete(name)
    runs = runs + [r for r in reference if r.config["strategy"] in strategies]
    groups = _by(runs, "strategy", "lora.alpha")
    alphas = sorted({r.config["lora.alpha"] for r in runs})
    print(f"### {title}\n")
    if not alphas:
        print(f"No run complete yet ({partial} incomplete).\n")
        return
    print("| strategy | " + " | ".join(f"α={a:g}" for a in alphas) + " | spread (max − min) |")
    print("|---|" + "---|" * (len(alphas) + 1))
    for s in strategies:
        cells, got = [], []
        for a in alphas:
            rs = groups.get((s, a))
            if not rs:
                cells.append("–")
                continue
            got.append(mean_std([r.final["accuracy"] for r in rs])[0])
            rates = sorted({r.config["learning-rate"] for r in rs})
            cells.append(f"{got[-1]:.4f}" + (f" (rate {', '.join(f'{x:g}' for x in rates)})" if show_rate else ""))
        print(f"| {s} | " + " | ".join(cells) + (f" | {max(got) - min(got):.4f} |" if got else " | – |"))
    print(f"\n{len(runs)} runs complete, {partial} incomplete; {_wall(name)}.\n")


def alpha() -> None:
    # alpha = 16 is the main grid's cell with the same settings (sst2-alpha.toml says why).
    _alpha_table("Sensitivity to LoRA alpha (SST-2, IID, ε = 3)", "sst2-alpha", _seed0_iid_eps3("sst2"), STRATEGIES, show_rate=False)


def dp_alpha() -> None:
    # alpha = 16 is sst2-dp.toml's cell with the same settings (sst2-dp-alpha.toml says why).
    title = "Sensitivity to LoRA alpha with the DP recipe, rate × alpha held (SST-2, IID, ε = 3, seed 0)"
    _alpha_table(title, "sst2-dp-alpha", _seed0_iid_eps3("sst2-dp"), STRATEGIES, show_rate=True)


def rte() -> None:
    runs, partial = _complete("rte")
    print("### RTE (sentence pairs), ε = 3\n")
    if not runs:
        print(f"No run complete yet ({partial} incomplete).\n")
        return
    print("| strategy | final accuracy | best accuracy |\n|---|---|---|")
    for (s,), reps in sorted(_by(runs, "strategy").items()):
        print(f"| {s} | {_fmt([r.final['accuracy'] for r in reps])} | {_fmt([max(x['accuracy'] for x in _evaluated(r.rows)) for r in reps])} |")
    majority = {r.majority for r in runs}
    if majority:
        print(f"\nMajority class of RTE validation: {max(majority):.4f}.")
    print(f"\n{len(runs)} runs complete, {partial} incomplete; {_wall('rte')}.\n")


def methods() -> None:
    runs, partial = _complete("sst2-methods")
    print("### Every method, SST-2, IID, sample-level ε = 3\n")
    print(
        "| strategy | user-level DP | final accuracy | personalised (client eval) | kB up / client / round | kB down / client / round (last round) | user-level ε |"
    )
    print("|---|---|---|---|---|---|---|")
    for (s, mode), reps in sorted(_by(runs, "strategy", "user-dp.mode").items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        last = reps[0].final
        clients = max(1, last.get("clients") or 1)
        personal = [r.final["client_eval_accuracy"] for r in reps if r.final.get("client_eval_accuracy") is not None]
        user_eps = [r.final["user_epsilon"] for r in reps if r.final.get("user_epsilon") is not None]
        print(
            f"| {s} | {mode or 'off'} | {_fmt([r.final['accuracy'] for r in reps])} | {_fmt(personal) if personal else '–'} | "
            f"{last['bytes_up'] / clients / 1e3:.0f} | {last['bytes_down'] / clients / 1e3:.0f} | {_fmt(user_eps, 2) if user_eps else '–'} |"
        )
    print(f"\n{len(runs)} runs complete, {partial} incomplete; {_wall('sst2-methods')}.\n")


def smollm2() -> None:
    runs, partial = _complete("smollm2-sst2")
    print("### SmolLM2-135M-Instruct on SST-2 as instructions (3 clients, IID, ε = 3)\n")
    print(
        "| strategy | exact match by round (0 = zero-shot) | final loss (nats / response token) | ε spent | kB up / client / round | upload vs LoRA (values) | wall time |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in sorted(runs, key=lambda r: r.config["strategy"]):
        em = " → ".join(f"{x['exact_match']:.3f}" for x in r.rows)
        last = r.final
        payload = json.load(open(os.path.join(r.path, "config.json")))["payload"]
        minutes = sum(x.get("seconds", 0) for x in r.rows) / 60
        print(
            f"| {r.config['strategy']} | {em} | {last['loss']:.4f} | {last['epsilon']:.3f} | {last['bytes_up'] / max(1, last['clients']) / 1e3:.0f} | "
            f"{payload['upload-values-vs-lora']:.2f} | {minutes:.0f} min of rounds |"
        )
    if runs:
        print(f"\nMajority answer of the 128 evaluation reviews: {runs[0].majority:.3f}.")
    print(f"\n{len(runs)} runs complete, {partial} incomplete; {_wall('smollm2-sst2')}.\n")


def wire() -> None:
    runs, partial = _complete("sst2-wire")
    print("### Wire format: float32, float16, bfloat16 (SST-2, IID, ε = 3, seed 0)\n")
    print("| strategy | wire.dtype | final accuracy | final loss | kB up / client / round | up vs LoRA float32 |")
    print("|---|---|---|---|---|---|")
    per_client = {(r.config["strategy"], r.config["wire.dtype"]): r.final["bytes_up"] / max(1, r.final["clients"]) for r in runs}
    base = per_client.get(("lora", "float32"))
    order = {"float32": 0, "float16": 1, "bfloat16": 2}
    for r in sorted(runs, key=lambda r: (r.config["strategy"], order[r.config["wire.dtype"]])):
        key = (r.config["strategy"], r.config["wire.dtype"])
        ratio = f"{per_client[key] / base:.3f}" if base else "–"
        print(f"| {key[0]} | {key[1]} | {r.final['accuracy']:.4f} | {r.final['loss']:.5f} | {per_client[key] / 1e3:.1f} | {ratio} |")
    print(f"\n{len(runs)} runs complete, {partial} incomplete; {_wall('sst2-wire')}.\n")


def lost_replies() -> None:
    """Runs in which some round aggregated fewer clients than it sampled: listed, so a
    number in the tables never hides a round that lost a client."""
    runs = find_runs([ROOT]) if os.path.isdir(ROOT) else []
    lost = [
        (os.path.relpath(r.path, ROOT), x["round"], x["clients"], x["sampled"])
        for r in runs
        for x in r.rows
        if x.get("sampled") and x.get("clients", 0) < x["sampled"]
    ]
    print("### Rounds that lost a client\n")
    if not lost:
        print(f"None: in all {len(runs)} runs every round aggregated every sampled client.\n")
        return
    for path, rnd, got, sampled in lost:
        print(f"- {path}: round {rnd} aggregated {got} of {sampled} clients")
    print()


if __name__ == "__main__":
    targets = [float(a) for a in sys.argv[1:]] or [0.65, 0.70]
    recipe()
    dp_grid()
    dp_rates()
    dp_rounds()
    dp_dropout()
    dp_goal()
    dp_schedule()
    dp_reach()
    dp_ema()
    dp_share()
    dp_layers()
    dp_targets()
    dp_steps()
    goal_cells()
    sweep()
    main_grid()
    for target in targets:
        communication(target)
    alpha()
    dp_alpha()
    rte()
    methods()
    smollm2()
    wire()
    lost_replies()
