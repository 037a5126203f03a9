"""Experiment tracking: one small interface, three backends.

The server logs every round's scalars through a ``Tracker``. Backends are
chosen by the run config key ``tracking.backends`` (comma-separated, or ``none``):

- ``tensorboard`` (default): event files in ``<run dir>/tensorboard``, so
  ``tensorboard --logdir <output-dir>`` shows every run of a grid side by side.
- ``wandb``: Weights & Biases; ``tracking.wandb-mode`` defaults to ``offline``
  (no network; ``wandb sync`` uploads later).
- ``mlflow``: MLflow, to ``tracking.mlflow-uri`` or a SQLite store
  ``<output-dir>/mlflow.db`` (MLflow 3 retired the file store).

wandb and mlflow are optional installs (``pip install fedlora[tracking]``); a
run that asks for one that is missing fails at start-up, naming the key.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from typing import Any

from .config import ConfigError, TrackingConfig

log = logging.getLogger("fedlora")


def round_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl row worth plotting, under stable tags."""
    keys = {
        "accuracy": "eval/accuracy",
        "loss": "eval/loss",
        "epsilon": "privacy/epsilon",
        "bytes_up": "comm/bytes_up",
        "bytes_down": "comm/bytes_down",
        "cum_bytes_up": "comm/cum_bytes_up",
        "cum_bytes_down": "comm/cum_bytes_down",
        "train_loss": "train/loss",
        "seconds": "time/round_seconds",
        "train_seconds_max": "time/train_seconds_max",
        "clients": "clients/replies",
        "failures": "clients/failures",
        "client_eval_accuracy": "client_eval/accuracy",
    }
    return {tag: float(row[k]) for k, tag in keys.items() if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)}


class Tracker:
    """A sink for a run's config and per-round scalars."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))

    def log_config(self, config: Mapping[str, Any]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted(config.items()))
        self.writer.add_text("run-config", "| key | value |\n|---|---|\n" + table)

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, server_round)
        self.writer.flush()  # a grid's dashboard is read while runs go on

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: str, name: str, cfg: TrackingConfig) -> None:
        import wandb

        self.run = wandb.init(
            project=cfg.project,
            name=name,
            dir=run_dir,
            mode=cfg.wandb_mode,
            reinit="finish_previous",
            # Resuming a fedlora run continues the same wandb run.
            id=_safe_id(name),
            resume="allow",
        )

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=server_round)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    def __init__(self, run_dir: str, name: str, cfg: TrackingConfig, output_dir: str) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = cfg.mlflow_uri or "sqlite:///" + os.path.join(os.path.abspath(output_dir), "mlflow.db")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.project)
        # A resumed fedlora run continues its MLflow run (id kept in the run dir).
        os.makedirs(run_dir, exist_ok=True)
        id_file = os.path.join(run_dir, "mlflow-run-id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
        with open(id_file, "w") as f:
            f.write(self.run.info.run_id)

    def log_config(self, config: Mapping[str, Any]) -> None:
        params = {k: str(v)[:250] for k, v in config.items()}  # MLflow caps param values
        existing = self.mlflow.get_run(self.run.info.run_id).data.params
        self.mlflow.log_params({k: v for k, v in params.items() if k not in existing})

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=server_round)

    def close(self) -> None:
        self.mlflow.end_run()


class MultiTracker(Tracker):
    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_config(self, config: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log_round(self, server_round: int, scalars: Mapping[str, float]) -> None:
        for t in self.trackers:
            t.log_round(server_round, scalars)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def _safe_id(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:120]


def check_available(cfg: TrackingConfig) -> None:
    """Fail at start-up, naming the key, when a chosen backend is not installed."""
    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    for backend in cfg.backends:
        if importlib.util.find_spec(modules[backend]) is None:
            raise ConfigError("tracking.backends", ",".join(cfg.backends), f"{backend} is not installed (pip install 'fedlora[tracking]')")


def make_tracker(cfg: TrackingConfig, run_dir: str, name: str, output_dir: str) -> Tracker:
    check_available(cfg)
    trackers: list[Tracker] = []
    for backend in cfg.backends:
        if backend == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir))
        elif backend == "wandb":
            trackers.append(WandbTracker(run_dir, name, cfg))
        else:
            trackers.append(MlflowTracker(run_dir, name, cfg, output_dir))
    return MultiTracker(trackers)
