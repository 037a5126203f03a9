"""The fedlora ServerApp: Flower glue around ``fedlora.experiment``."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from .config import parse_run_config
from .experiment import Experiment
from .logs import setup_logging

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    run = parse_run_config(context.run_config)
    exp = Experiment(run, run_id=context.run_id)
    strategy = exp.make_strategy()
    strategy.start(
        grid=grid,
        initial_arrays=exp.initial_arrays,
        num_rounds=run.num_server_rounds,
        timeout=run.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=exp.evaluate_round,
    )
    exp.finish()
