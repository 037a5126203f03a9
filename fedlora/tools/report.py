"""``fedlora report``: a self-contained HTML page (and PNGs) comparing runs.

Reads every run folder (``config.json`` + ``metrics.jsonl``) under the given
folders. Runs that differ only in ``seed`` are replicates: curves show their
mean (band: ± one standard deviation) and the table mean ± std. Colours are
strategies; the other keys that vary between runs split the plots into panels.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

# Keys that say where or how a run was stored, not what it computed.
IGNORED_KEYS = {
    "output-dir",
    "run-name",
    "resume",
    "cache-dir",
    "data-dir",
    "tracking.backends",
    "tracking.project",
    "tracking.wandb-mode",
    "tracking.mlflow-uri",
}
REPLICATE_KEY = "seed"
HUE_KEY = "strategy"


def _value(run_config: dict[str, Any], key: str) -> Any:
    """A run's value for ``key``; runs recorded before a key existed had its default."""
    from ..config import DEFAULTS

    return run_config.get(key, DEFAULTS.get(key))


@dataclass
class Run:
    path: str
    config: dict[str, Any]  # the run config as the run recorded it
    rows: list[dict[str, Any]]  # metrics.jsonl, round 0 first
    complete: bool
    majority: float | None

    @property
    def final(self) -> dict[str, Any]:
        """The last row the server evaluated (a complete run's last row; ``eval.every`` can
        leave an incomplete run's last rows without an evaluation)."""
        return next((r for r in reversed(self.rows) if r.get("loss") is not None), self.rows[-1])


def find_runs(folders: list[str]) -> list[Run]:
    runs = []
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            if "config.json" in files and "metrics.jsonl" in files:
                with open(os.path.join(root, "config.json")) as f:
                    cfg = json.load(f)
                with open(os.path.join(root, "metrics.jsonl")) as f:
                    rows = [json.loads(line) for line in f if line.strip()]
                if rows:
                    runs.append(
                        Run(
                            root,
                            cfg["run-config"],
                            rows,
                            os.path.isfile(os.path.join(root, "result.json")),
                            cfg.get("data", {}).get("eval-majority-accuracy"),
                        )
                    )
                dirs[:] = []  # a run folder holds no runs
    return runs


def varying_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config} - IGNORED_KEYS)
    return [k for k in keys if len({json.dumps(_value(r.config, k)) for r in runs}) > 1]


def _label(key: str, value: Any) -> str:
    if key == "dp.epsilon":
        return "non-private" if not value else f"ε={value:g}"
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def group_runs(runs: list[Run], keys: list[str]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[tuple(_value(r.config, k) for k in keys)].append(r)
    return dict(sorted(groups.items(), key=lambda kv: json.dumps(kv[0])))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _curve(runs: list[Run], x_key: str, y_key: str) -> tuple[list[float], list[float], list[float]]:
    """Mean and std of y over the replicates, at the rounds all of them reached and
    measured (``eval.every`` leaves rounds without an evaluation)."""
    n = min(len(r.rows) for r in runs)
    xs, ys, sd = [], [], []
    for i in range(n):
        if any(r.rows[i].get(y_key) is None for r in runs):
            continue
        xs.append(statistics.fmean(float(r.rows[i].get(x_key) or 0) for r in runs))
        m, s = mean_std([float(r.rows[i].get(y_key) or 0) for r in runs])
        ys.append(m)
        sd.append(s)
    return xs, ys, sd


class Report:
    def __init__(self, runs: list[Run], out: str, title: str) -> None:
        self.runs, self.out, self.title = runs, out, title
        self.varying = varying_keys(runs)
        self.group_keys = [k for k in self.varying if k != REPLICATE_KEY]
        self.hue_values = sorted({str(r.config.get(HUE_KEY)) for r in runs})
        self.figures: list[tuple[str, str, str]] = []  # (file, title, caption)

    def _color(self, hue: Any) -> str:
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
        return palette[self.hue_values.index(str(hue)) % len(palette)]

    def _panels(self, exclude: set[str]) -> tuple[list[str], dict[tuple, list[Run]]]:
        keys = [k for k in self.group_keys if k not in exclude and k != HUE_KEY]
        return keys, group_runs(self.runs, keys)

    def _figure(self, n: int):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(n, 4)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        return plt, fig, list(axes.flat[:n])

    def _save(self, plt, fig, name: str, title: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(os.path.join(self.out, name), dpi=90)
        plt.close(fig)
        self.figures.append((name, title, caption))

    def curves(self, name: str, title: str, x_key: str, y_key: str, xlabel: str, ylabel: str, caption: str) -> None:
        keys, panels = self._panels(set())
        plt, fig, axes = self._figure(len(panels))
        for ax, (panel, runs) in zip(axes, panels.items()):
            for key, reps in group_runs(runs, [HUE_KEY]).items():
                xs, ys, sd = _curve(reps, x_key, y_key)
                color = self._color(key[0])
                ax.plot(xs, ys, marker="o", ms=3, color=color, label=f"{key[0]} (n={len(reps)})")
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], color=color, alpha=0.15)
            ax.set_title(", ".join(_label(k, v) for k, v in zip(keys, panel)) or "all runs", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        self._save(plt, fig, name, title, caption)

    def accuracy_vs_epsilon(self) -> None:
        eps_key = "dp.epsilon"
        if eps_key not in self.varying:
            return
        keys, panels = self._panels({eps_key})
        plt, fig, axes = self._figure(len(panels))
        for ax, (panel, runs) in zip(axes, panels.items()):
            eps_values = sorted({float(r.config[eps_key]) for r in runs}, key=lambda e: (e == 0, e))
            ticks = {e: i for i, e in enumerate(eps_values)}
            for key, reps in group_runs(runs, [HUE_KEY]).items():
                by_eps = group_runs(reps, [eps_key])
                pts = sorted(((ticks[float(e[0])], *mean_std([r.final["accuracy"] for r in rs])) for e, rs in by_eps.items()))
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=4, color=self._color(key[0]), label=key[0])
            ax.set_xticks(list(ticks.values()), [_label(eps_key, e) for e in eps_values], fontsize=8)
            ax.set_title(", ".join(_label(k, v) for k, v in zip(keys, panel)) or "all runs", fontsize=9)
            ax.set_ylabel("final accuracy (mean ± std over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        self._save(
            plt,
            fig,
            "accuracy_vs_epsilon.png",
            "Final accuracy vs privacy budget",
            "Error bars: one standard deviation over seeds. Smaller ε = stronger privacy.",
        )

    def table(self) -> tuple[list[str], list[list[str]]]:
        head = [*self.group_keys, "runs", "final accuracy", "best accuracy", "ε spent", "kB up / round", "MB up total", "s / round"]
        body = []
        for key, reps in group_runs(self.runs, self.group_keys).items():
            done = [r for r in reps if r.complete]
            use = done or reps

            def ms(values: list[float], fmt: str) -> str:
                m, s = mean_std(values)
                return f"{m:{fmt}} ± {s:{fmt}}" if len(values) > 1 else f"{m:{fmt}}"

            rounds = [max(1, r.final["round"]) for r in use]
            body.append(
                [
                    *(_label(k, v) if k == "dp.epsilon" else str(v) for k, v in zip(self.group_keys, key)),
                    f"{len(done)}" + (f" (+{len(reps) - len(done)} incomplete)" if len(done) < len(reps) else ""),
                    ms([r.final["accuracy"] for r in use], ".4f"),
                    ms([max(x["accuracy"] for x in r.rows if x.get("accuracy") is not None) for r in use], ".4f"),
                    ms([r.final["epsilon"] for r in use], ".3f"),
                    ms([r.final.get("cum_bytes_up", 0) / n / 1000 for r, n in zip(use, rounds)], ".2f"),
                    ms([r.final.get("cum_bytes_up", 0) / 1e6 for r in use], ".2f"),
                    ms([sum(x["seconds"] for x in r.rows) / n for r, n in zip(use, rounds)], ".1f"),
                ]
            )
        return head, body

    def build(self) -> str:
        os.makedirs(self.out, exist_ok=True)
        self.curves(
            "accuracy_vs_round.png",
            "Accuracy vs round",
            "round",
            "accuracy",
            "round",
            "eval accuracy",
            "Centralised evaluation of the global model after each round (round 0: the initial model). Band: ± one std over seeds.",
        )
        self.accuracy_vs_epsilon()
        self.curves(
            "accuracy_vs_bytes.png",
            "Accuracy vs bytes uploaded",
            "cum_bytes_up",
            "accuracy",
            "cumulative bytes uploaded (all clients)",
            "eval accuracy",
            "Communication cost: every client's upload, summed over rounds.",
        )
        self.curves(
            "epsilon_vs_round.png",
            "Privacy spent vs round",
            "round",
            "epsilon",
            "round",
            "ε (max over clients)",
            "Sample-level ε reported by the clients' RDP accountants; 0 for non-private runs.",
        )
        head, body = self.table()
        page = self._html(head, body)
        path = os.path.join(self.out, "report.html")
        with open(path, "w") as f:
            f.write(page)
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump([dict(zip(head, row)) for row in body], f, indent=2)
        return path

    def _html(self, head: list[str], body: list[list[str]]) -> str:
        esc = html.escape
        parts = [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{esc(self.title)}</title><style>",
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
            "img{max-width:100%;border:1px solid #eee}figure{margin:1.5em 0}figcaption{color:#555;font-size:13px}",
            "</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
            f"<p>{len(self.runs)} runs ({sum(r.complete for r in self.runs)} complete) from "
            f"{esc(', '.join(sorted({os.path.dirname(r.path) for r in self.runs})))}. "
            f"Runs differ in: {esc(', '.join(self.varying) or 'nothing')}; replicates over <code>{REPLICATE_KEY}</code>.</p>",
        ]
        majority = {r.majority for r in self.runs if r.majority is not None}
        if len(majority) == 1:
            parts.append(f"<p>Majority-class accuracy of the eval split: {majority.pop():.4f} (the bar to beat).</p>")
        parts.append("<h2>Summary</h2><table id='summary'><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>")
        for row in body:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</tbody></table>")
        for name, title, caption in self.figures:
            with open(os.path.join(self.out, name), "rb") as f:
                data = base64.b64encode(f.read()).decode()
            parts.append(
                f"<figure><h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(caption)} (also {esc(name)})</figcaption></figure>"
            )
        parts.append("</body></html>")
        return "\n".join(parts)


def make_report(folders: list[str], out: str | None = None, title: str = "fedlora comparison") -> str:
    runs = find_runs(folders)
    if not runs:
        raise FileNotFoundError(f"no runs (config.json + metrics.jsonl) under {', '.join(folders)}")
    return Report(runs, out or os.path.join(folders[0], "report"), title).build()


def main(args) -> int:
    try:
        path = make_report(args.run_dirs, args.out, args.title)
    except FileNotFoundError as e:
        print(f"fedlora report: {e}")
        return 2
    print(f"report: {path}")
    return 0
