"""``fedlora budget``: what each data source of a node has spent, across runs.

For the operator of a node with its own data: reads the node's state directory
(node config ``state-dir``, else ``$FEDLORA_CACHE_DIR`` or ``~/.cache/fedlora``)
and composes every run's accountant history per data source, by Opacus' RDP
accountant or (``--accountant prv``) its PRV accountant.
"""

from __future__ import annotations

import argparse

from ..config import default_state_dir
from ..node_store import source_ledgers
from ..privacy import epsilon_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default="", help="the node's state directory (default: $FEDLORA_CACHE_DIR or ~/.cache/fedlora)")
    p.add_argument("--delta", type=float, default=1e-5, help="delta at which epsilon is reported (the node's privacy.max-delta)")
    p.add_argument("--accountant", choices=["rdp", "prv"], default="rdp", help="how the histories compose into epsilon (the run config's dp.accountant)")


def main(args: argparse.Namespace) -> int:
    root = args.state_dir or default_state_dir()
    sources = source_ledgers(root)
    if not sources:
        print(f"no data source has spent any privacy budget under {root}")
        return 0
    print(f"privacy spent per data source under {root} (epsilon at delta {args.delta:g} by the {args.accountant.upper()} accountant, all runs composed)")
    for source, runs in sources:
        steps = sum(int(h[2]) for history in runs.values() for h in history)
        total = epsilon_of([h for history in runs.values() for h in history], args.delta, args.accountant)
        print(f"  {source}: epsilon {total:.4f} over {len(runs)} run(s), {steps} DP steps")
        for run_key, history in runs.items():
            print(f"    run {run_key[:12]}: epsilon {epsilon_of(history, args.delta, args.accountant):.4f}, {sum(int(h[2]) for h in history)} steps")
    return 0
