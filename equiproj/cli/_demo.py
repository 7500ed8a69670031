"""``equiproj demo``: the paper's experiments at laptop scale, with the projection penalty against
unconstrained, sample-based and strictly equivariant training, on data whose symmetry is imperfect.

Experiments (:mod:`equiproj.cli.experiments`): ``so2``, ``smoke``, ``voxels`` by default; on data
from outside the project, as options: ``digits`` (scikit-learn's handwritten digits) and ``phiflow``
(smoke plumes simulated by PhiFlow). Each of these two runs only where its package is installed and
says how to install it otherwise; and ``symmetry``: which subgroup of D4 a model keeps, read off
its symmetry spectrum.

Run::

    equiproj demo [--full] [--seed N] [--out DIR] [--only so2|smoke|voxels|digits|phiflow|symmetry]
    python -m equiproj demo [same options]

Everything is seeded (data, initialisation, batches, rotations). One number depends on the
machine: the step count of the "equal wall-clock" sample-based run, computed from the step
times of the two penalties measured in the same run (printed with the table). The PNGs need
matplotlib (``pip install matplotlib``); without it the tables and CSVs are still written.

The models are plain ``nn.Linear`` / ``nn.Conv2d`` stacks with symmetry declarations
(:func:`equiproj.nn.declare`); the penalty is :class:`equiproj.nn.ProjectionPenalty`, the strict
regime :func:`equiproj.nn.project_` after every optimiser step.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

from . import _args
from .experiments import DEFAULT_EXPERIMENTS, EXPERIMENTS
from .experiments._digits import SKLEARN_MISSING
from .experiments._phiflow import PHIFLOW_MISSING, phiflow_available

__all__ = ["EXPERIMENTS", "DEFAULT_EXPERIMENTS", "script_main", "add_arguments", "run", "main"]


def _missing_package(name: str) -> str | None:
    """Why experiment ``name`` cannot run here (its optional package is not installed), else ``None``."""
    if name == "digits" and importlib.util.find_spec("sklearn") is None:
        return SKLEARN_MISSING
    if name == "phiflow" and not phiflow_available():
        return PHIFLOW_MISSING
    return None


def _experiment(name: str):
    """The :class:`~equiproj.cli.experiments.Experiment` called ``name``."""
    return EXPERIMENTS[name]


def script_main(argv, name: str, description: str, param: str | None = None, param_help: str = "") -> int:
    """The entry point of the ``experiments/`` script of experiment ``name``: ``--full``, ``--seed``,
    ``--out``, ``--threads`` and, with ``param``, ``--<param>`` overriding ``config.params.<param>``
    (outputs tagged ``_<param><value>``). Prints the table, then the time and config."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--full", action="store_true")
    p.add_argument("--seed", type=_args.seed, default=0)
    p.add_argument("--out", type=_args.output_dir, default="experiments/results")
    p.add_argument("--threads", type=_args.positive_int, default=1,
                   help="torch threads (default 1: the models are small, and one thread keeps its speed when other "
                        "jobs share the cores)")
    if param:
        p.add_argument(f"--{param}", type=float, help=f"{param_help} (default: the config's)")
    args = p.parse_args(argv)
    missing = _missing_package(name)
    if missing:
        print(missing)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    experiment = _experiment(name)
    cfg = experiment.config.full() if args.full else experiment.config.demo()
    value = getattr(args, param) if param else None
    tag = ""
    if value is not None:
        cfg = cfg.with_params(**{param: value})
        tag = f"_{param}{value:g}"
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    result = experiment.run(cfg, args.seed, args.out, lambda m: print(m, file=sys.stderr, flush=True), tag)
    print(experiment.format_table(result))
    print(f"\n({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads; config {cfg})")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``equiproj demo`` options (``--full``, ``--seed``, ``--out``, ``--only``)."""
    parser.add_argument("--full", action="store_true", help="the full sizes (3 seeds, full grids): about 100 min on 2 cores")
    parser.add_argument("--seed", type=_args.seed, default=0, help="seed of data, initialisation, batches (default 0)")
    parser.add_argument("--out", type=_args.output_dir, default="equiproj-demo",
                        help="output directory for tables, CSVs, PNGs (created if missing)")
    parser.add_argument("--only", choices=tuple(EXPERIMENTS),
                        help="run one experiment only; digits (needs scikit-learn) and phiflow (needs PhiFlow) run "
                             "only this way")
    parser.add_argument("--threads", type=_args.positive_int, default=1,
                        help="torch threads, >= 1 (default 1: the models are small; on a quiet 2-core machine two "
                             "threads take 40 s instead of 60 s, but with another job on one core they took 6 to over "
                             "20 minutes, one thread 61 s)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``args`` (see :func:`add_arguments`); prints one table per experiment."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"command{'_' + args.only if args.only else ''}.txt"), "w") as f:
        f.write(" ".join(["equiproj demo"] + (["--full"] if args.full else []) + [f"--seed {args.seed}"]
                         + ([f"--only {args.only}"] if args.only else [])
                         + ([f"--threads {args.threads}"] if getattr(args, "threads", None) else [])) + "\n")
        f.write(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    for number, name in enumerate(EXPERIMENTS, 1):
        if name != args.only and (args.only or name not in DEFAULT_EXPERIMENTS):
            continue
        missing = _missing_package(name)
        if missing:
            print(missing)
            continue
        experiment = _experiment(name)
        log(f"experiment {number}: {experiment.title}")
        t = time.perf_counter()
        result = experiment.run(experiment.config.full() if args.full else experiment.config.demo(), args.seed,
                                args.out, log, "")
        print(experiment.format_table(result))
        print(f"\n(experiment {number}: {time.perf_counter() - t:.0f} s)\n")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; outputs in {args.out}")
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="equiproj demo", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))
