"""Experiment 1: SO(2) invariance toy (wedge and wavey rings), grid over lambda_G x lambda_perp.

    python experiments/so2_toy.py [--full] [--seed N] [--out DIR] [--threads N]

Without ``--full``: the reduced grid of ``equiproj demo``. The code lives in
``equiproj.demo`` (``SO2Config``, ``run_so2``) so that ``equiproj demo`` runs it too.
"""

import argparse
import os
import sys
import time

import torch

from equiproj.demo import SO2Config, format_so2_table, run_so2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    cfg = SO2Config.full() if args.full else SO2Config.demo()
    t0 = time.perf_counter()
    rows = run_so2(cfg, args.seed, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_so2_table(rows))
    print(f"\n({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads; config {cfg})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
