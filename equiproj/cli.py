"""Command line: ``equiproj {bench,verify,info}`` (also ``python -m equiproj``)."""

from __future__ import annotations

import argparse
import sys


def _verify(args) -> int:
    from .verify import format_table, verify_groups

    rows = verify_groups(seed=args.seed)
    print(format_table(rows))
    worst = max(max(r["rel_err_perp"], r["rel_err_G"], r["rel_err_near_f64"]) for r in rows)
    print(f"\nlargest relative error (float64): {worst:.1e}")
    return 0 if worst < 1e-8 else 1


def _info(args) -> int:
    import torch

    import equiproj

    print(f"equiproj {equiproj.__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="equiproj", description="Exact projection-based equivariance energies.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check the spectral energies against the float64 reference for every group")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_verify)
    p = sub.add_parser("bench", help="verification, then micro-benchmarks (the README's main job)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_verify)
    p = sub.add_parser("info", help="versions and available backends")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
