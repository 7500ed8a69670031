"""Smoke plumes simulated by PhiFlow (2-D incompressible smoke with buoyancy, inflow position and
buoyancy direction varied, buoyancy strength depending on the direction: the symmetry breaking of
Wang, Walters & Yu 2022's rotation split), with a C4-declared CNN trained by six regimes.

    python experiments/phiflow_smoke.py [--full] [--seed N] [--out DIR] [--threads N] [--asymmetry A]
                                        [--cache-dir DIR] [--generate-only]

The data set is generated once per set of parameters and seed, and cached as a compressed float16
npz (default folder ~/.cache/equiproj; it records the seed and the PhiFlow version);
``--generate-only`` writes it and stops. Without ``--full``: the short version of
``equiproj demo --only phiflow``. Needs PhiFlow (``pip install phiflow==3.4.0``, or
``pip install 'equiproj[experiments]'``).
"""

import argparse
import os
import sys
import time
from dataclasses import replace

import torch

from equiproj.cli import _args
from equiproj.cli.experiments._phiflow import (PHIFLOW_MISSING, PlumeConfig, format_table, phiflow_available,
                                               plume_dataset, run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="64x64, 16 training plumes, 3 seeds, lambdas on validation")
    p.add_argument("--seed", type=_args.seed, default=0)
    p.add_argument("--out", type=_args.output_dir, default="experiments/results")
    p.add_argument("--threads", type=_args.positive_int, help="torch threads (default: torch's choice)")
    p.add_argument("--asymmetry", type=float, help="relative growth of the buoyancy over the four directions "
                                                   "(0: C4-symmetric data; default: the config's)")
    p.add_argument("--cache-dir", help="folder of the cached data sets (default ~/.cache/equiproj)")
    p.add_argument("--generate-only", action="store_true", help="write the data set and stop")
    args = p.parse_args(argv)
    if not phiflow_available():
        print(PHIFLOW_MISSING)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PlumeConfig.full() if args.full else PlumeConfig.demo()
    tag = ""
    if args.asymmetry is not None:
        cfg = cfg.with_params(asymmetry=args.asymmetry)
        tag = f"_asymmetry{args.asymmetry:g}"
    if args.cache_dir:
        cfg = replace(cfg, cache_dir=args.cache_dir)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if args.generate_only:
        _, meta = plume_dataset(cfg.params, (cfg.train_traj, cfg.val_traj, cfg.test_traj),
                                (cfg.frames, cfg.horizon + 1, cfg.horizon + 1), seed=50_000 + args.seed,
                                warmup=cfg.warmup, twins=cfg.twins, cache_dir=cfg.cache_dir, log=log)
        print(f"data set {meta['digest']}: PhiFlow {meta['versions']['phiflow']}, seed {meta['seed']}, generated in "
              f"{meta['generation_s']:.0f} s, rotated-twin difference {meta['twin_difference']:.2e}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    result = run(cfg, args.seed, args.out, log, tag)
    print(format_table(result))
    print(f"\n({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads; config {cfg})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
