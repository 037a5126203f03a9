"""The accountant's cost at a node's start and per message, against Opacus' own calls.

    python benchmarks/accountant.py [--sizes 30,67,673,6735] [--batch-size 16] [--steps 6]

For nodes of each size (examples) with expected batches of --batch-size over --steps
planned steps at epsilon 3 (the shapes of benchmarks/scale.py: SST-2 over 10 to 1,000
nodes), side by side in one run:

- calibration: ``privacy.calibrate_noise`` (Opacus' search, its comparisons decided by
  bounds from a few RDP orders where they can be) against Opacus' ``get_noise_multiplier``; both must return the same
  noise multiplier;
- epsilon: three ``privacy.epsilon_of`` calls on the same (noise, rate), as a node makes
  per message (the per-step RDP computed once, at the orders that can hold the minimum
  only), against three Opacus
  ``RDPAccountant.get_epsilon`` calls.

Each figure is the best of --repeat runs, the caches cleared before each.
"""

from __future__ import annotations

import argparse
import time
import warnings


def best_of(repeat: int, fn) -> tuple[float, object]:
    from fedlora import privacy

    best, out = float("inf"), None
    for _ in range(repeat):
        privacy._PER_STEP.clear()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="30,67,673,6735", help="node sizes (examples), comma-separated")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="planned steps (rounds x local steps)")
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # Opacus' "optimal order is the largest alpha"

    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from fedlora import privacy
    from fedlora.config import DPConfig

    dp = DPConfig(epsilon=args.epsilon, delta=1e-5)
    print(f"epsilon {args.epsilon}, delta 1e-5, batch {args.batch_size}, {args.steps} planned steps, best of {args.repeat}")
    print(f"{'examples':>8} {'rate':>7} {'sigma':>10} {'calibrate s':>12} {'Opacus s':>9} {'ratio':>6} {'3 eps s':>8} {'Opacus s':>9} {'ratio':>6}")
    for n in (int(x) for x in args.sizes.split(",")):
        q = min(1.0, args.batch_size / n)
        ours_s, ours = best_of(args.repeat, lambda q=q: privacy.calibrate_noise(dp, q, args.steps))
        theirs_s, theirs = best_of(
            args.repeat,
            lambda q=q: get_noise_multiplier(
                target_epsilon=dp.epsilon,
                target_delta=dp.delta,
                sample_rate=q,
                steps=args.steps,
                accountant="rdp",
                epsilon_tolerance=privacy.EPSILON_TOLERANCE,
                alphas=privacy.ALPHAS,
            ),
        )
        if ours != theirs:
            raise SystemExit(f"noise multipliers differ at {n} examples: {ours} != {theirs}")
        history = [(ours, q, args.steps // 2)]

        def opacus_eps(history=history):
            acc = RDPAccountant()
            acc.history = list(history)
            return [acc.get_epsilon(delta=dp.delta, alphas=privacy.ALPHAS) for _ in range(3)]

        eps_s, eps = best_of(args.repeat, lambda history=history: [privacy.epsilon_of(history, dp.delta) for _ in range(3)])
        opacus_s, opacus = best_of(args.repeat, opacus_eps)
        if eps != opacus:
            raise SystemExit(f"epsilons differ at {n} examples: {eps} != {opacus}")
        print(
            f"{n:>8} {q:>7.4f} {ours:>10.6g} {ours_s:>12.3f} {theirs_s:>9.3f} {theirs_s / ours_s:>6.2f} {eps_s:>8.3f} {opacus_s:>9.3f} {opacus_s / eps_s:>6.2f}"
        )


if __name__ == "__main__":
    main()
