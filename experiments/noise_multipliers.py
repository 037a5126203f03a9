"""The noise multiplier each DP schedule calibrates, and the noise it puts on a
step's mean gradient relative to the clipping norm (docs/RESULTS.md, "The DP recipe").

    python experiments/noise_multipliers.py [--examples 22449] [--trained 37634] [--accountant rdp|prv]

For a client of ``--examples`` sentences (a third of SST-2's training split) at
ε = 3 and 1, δ = 1e-5: sigma as fedlora's ledger calibrates it (Opacus' RDP
accountant, or its PRV accountant with ``--accountant prv``), and sigma·sqrt(d)/B, the expected norm of the noise on the mean of a
step's clipped gradients in units of the clipping norm (d = ``--trained`` values:
FFA-LoRA's B on query and value of MiniLM plus the head), and the seconds the
calibration took.
"""

from __future__ import annotations

import argparse
import math
import time

from fedlora.config import parse_run_config
from fedlora.privacy import calibrate_noise

SCHEDULES = [(64, 40), (512, 24), (512, 48), (256, 48), (128, 96), (512, 160), (1024, 80), (2048, 40)]  # (expected batch, steps per client)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=22449)
    p.add_argument("--trained", type=int, default=37634)
    p.add_argument("--accountant", choices=["rdp", "prv"], default="rdp")
    args = p.parse_args()
    print(f"accountant: {args.accountant}")
    print("epsilon | expected batch | steps | sentences per client | sigma | noise norm on the mean / C | calibration s")
    for eps in (3.0, 1.0):
        dp = parse_run_config({"dp.epsilon": eps, "dp.accountant": args.accountant}).dp
        for batch, steps in SCHEDULES:
            start = time.perf_counter()
            sigma = calibrate_noise(dp, batch / args.examples, steps)
            seconds = time.perf_counter() - start
            print(f"{eps:g} | {batch} | {steps} | {batch * steps} | {sigma:.3f} | {sigma * math.sqrt(args.trained) / batch:.3f} | {seconds:.2f}")


if __name__ == "__main__":
    main()
