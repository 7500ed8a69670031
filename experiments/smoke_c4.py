"""Experiment 2: smoke plume with a C4-declared CNN: no penalty, projection penalty, data-level
sample-based penalty (equal wall-clock time and equal steps), strictly projected.

    python experiments/smoke_c4.py [--full] [--seed N] [--out DIR] [--threads N] [--wind W]

Without ``--full``: the short version of ``equiproj demo``. The code lives in
``equiproj.demo`` (``SmokeConfig``, ``run_smoke``) so that ``equiproj demo`` runs it too.
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

from equiproj.demo import SmokeConfig, format_smoke_table, run_smoke


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--wind", type=float, help="strength of the symmetry-breaking wind (default: the config's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SmokeConfig.full() if args.full else SmokeConfig.demo()
    if args.wind is not None:
        cfg = dataclasses.replace(cfg, params=dataclasses.replace(cfg.params, wind=args.wind))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    tag = "" if args.wind is None else f"_wind{args.wind:g}"
    result = run_smoke(cfg, args.seed, args.out, log=lambda m: print(m, file=sys.stderr, flush=True), tag=tag)
    print(format_smoke_table(result))
    print(f"\n({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads; config {cfg})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
