"""The applications: ``equiproj {bench,verify,demo,info}`` (also ``python -m equiproj``).

Nothing here is loaded by ``import equiproj``: the library never depends on its applications.
"""

from __future__ import annotations

import argparse
import sys

from . import _args


def _run_verify(args) -> int:
    from ._verify import format_table, verify_groups

    rows = verify_groups(seed=args.seed)
    print(format_table(rows))
    worst = max(max(r["rel_err_perp"], r["rel_err_G"], r["rel_err_near_f64"]) for r in rows)
    print(f"\nlargest relative error (float64): {worst:.1e}")
    return 0 if worst < 1e-8 else 1


def _run_bench(args) -> int:
    from . import bench

    if args.plot:
        try:
            bench.check_plot_available()
        except RuntimeError as e:
            print(f"equiproj bench: {e}", file=sys.stderr)
            return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("equiproj bench: --device cuda, but no CUDA device is available", file=sys.stderr)
            return 2
        index = int(args.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            print(f"equiproj bench: --device {args.device}, but there are {torch.cuda.device_count()} CUDA devices",
                  file=sys.stderr)
            return 2
    mode = "quick" if args.quick else "full" if args.full else "default"
    extra = {}
    if args.dense_max_gib is not None:
        extra["dense_max_bytes"] = int(args.dense_max_gib * 2**30)
    if args.layers:
        extra["layers"] = args.layers
    settings = bench.Settings.for_mode(mode, device=args.device, seed=args.seed, **extra)
    result = bench.run_suite(settings, progress=not args.no_progress)
    print(bench.format_report(result))
    if args.json:
        bench.write_json(result, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        bench.write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    ok = bool(result["verification"]) and all(bench.verification_ok(r) for r in result["verification"])
    return 0 if ok else 1


def _run_info(args) -> int:
    import torch

    import equiproj

    print(f"equiproj {equiproj.__version__}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    try:
        from .bench import available_backends

        device = "cuda" if torch.cuda.is_available() else "cpu"
        for b, why in available_backends(device).items():
            print(f"backend {b} on {device}: {why or 'available'}")
    except Exception as e:  # noqa: BLE001 - info must always print something useful
        print(f"backends: could not be probed ({type(e).__name__}: {e})")
    return 0


def _demo_arguments(p) -> None:
    from . import _demo as demo  # its arguments live with it; run() is called with them

    demo.add_arguments(p)
    p.set_defaults(func=demo.run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="equiproj", description="Exact projection-based equivariance energies.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check the spectral energies against the float64 reference for every group",
                       epilog=_args.EXIT_CODES)
    p.add_argument("--seed", type=_args.seed, default=0)
    p.set_defaults(func=_run_verify)
    from .bench import LAYER_KEYS

    p = sub.add_parser("bench", help="verification, then micro-benchmarks against sample-based and dense baselines "
                                     "(the README's main job; about 3 minutes on a 2-core CPU)",
                       epilog=f"{_args.EXIT_CODES}. The exit status is about correctness only: a missed timing "
                              "target is reported in the table (default and --full modes; --quick runs are too "
                              "short for targets to mean anything, so they are not evaluated there) and does "
                              "not change it. A timing whose interquartile range exceeds its median is measured "
                              "again a few times, then marked noisy: no ratio is computed from it.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller suite (well under a minute)")
    size.add_argument("--full", action="store_true", help="more layers, draws and repeats, torch.compile everywhere")
    p.add_argument("--device", type=_args.device, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--json", metavar="PATH", type=_args.output_file(),
                   help="also write every number as JSON (the folder must exist)")
    p.add_argument("--plot", metavar="PATH", type=_args.output_file(".png"),
                   help="also write a PNG of the timings (needs matplotlib; the folder must exist)")
    p.add_argument("--seed", type=_args.seed, default=0)
    p.add_argument("--layers", metavar="KEYS", type=_args.key_list(LAYER_KEYS),
                   help=f"only these rows, comma-separated: {','.join(LAYER_KEYS)}")
    p.add_argument("--dense-max-gib", type=_args.positive_float, default=None,
                   help="largest dense basis to build (GiB, > 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_run_bench)
    p = sub.add_parser("demo", help="the paper's experiments at laptop scale: SO(2) toy, C4 smoke CNN and O(3) "
                                    "voxel CNN (under 5 minutes on a CPU; --full for the full sizes, about 100 minutes)")
    _demo_arguments(p)
    p = sub.add_parser("info", help="versions and available backends")
    p.set_defaults(func=_run_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
