"""The ``fedlora`` console script: ``fedlora compare``, ``fedlora report``, ``fedlora budget`` and ``fedlora merge``."""

from __future__ import annotations

import argparse
import sys

from . import budget, compare, merge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA / FFA-LoRA experiments on Flower")
    sub = parser.add_subparsers(dest="command", required=True)
    compare.add_arguments(sub.add_parser("compare", help="run a grid of simulations (resumable)"))
    report_parser = sub.add_parser("report", help="HTML report and plots comparing the runs in a folder")
    report_parser.add_argument("run_dirs", nargs="+", help="folders holding run folders (searched recursively)")
    report_parser.add_argument("--out", help="where report.html and the PNGs go (default: <first folder>/report)")
    report_parser.add_argument("--title", default="fedlora comparison")
    budget.add_arguments(sub.add_parser("budget", help="a node's privacy spent per data source, across all runs"))
    merge.add_arguments(sub.add_parser("merge", help="merge a run's global adapter into its base model (a plain transformers model)"))
    args = parser.parse_args(argv)
    if args.command == "compare":
        return compare.main(args)
    if args.command == "budget":
        return budget.main(args)
    if args.command == "merge":
        return merge.main(args)
    from . import report  # matplotlib is imported only when a report is made

    return report.main(args)


if __name__ == "__main__":
    sys.exit(main())
