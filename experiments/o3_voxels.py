"""Experiment 3: O(3) voxel shapes (label weakly orientation-dependent) with an O(3)-declared 3-D
CNN: no penalty, projection penalty, data-level sample-based penalty at equal wall-clock time,
strictly projected (and, in the full run, the projection energy as a decoupled step).

    python experiments/o3_voxels.py [--full] [--seed N] [--out DIR] [--threads N] [--breaking B]

Without ``--full``: the short version of ``equiproj demo``. The code lives in
``equiproj.demo_voxels`` (``VoxelConfig``, ``run_voxels``) so that ``equiproj demo`` runs it too.
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

from equiproj.demo_voxels import VoxelConfig, format_voxels_table, run_voxels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--breaking", type=float,
                   help="probability that a near-vertical stick / ring gets the other label (default: the config's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VoxelConfig.full() if args.full else VoxelConfig.demo()
    if args.breaking is not None:
        cfg = dataclasses.replace(cfg, params=dataclasses.replace(cfg.params, breaking=args.breaking))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    tag = "" if args.breaking is None else f"_breaking{args.breaking:g}"
    result = run_voxels(cfg, args.seed, args.out, log=lambda m: print(m, file=sys.stderr, flush=True), tag=tag)
    print(format_voxels_table(result))
    print(f"\n({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads; config {cfg})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
