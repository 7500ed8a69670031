"""The first restriction of a model to every listed subgroup, in a cold process.

Restriction caches each branching rule ``(irrep of G, subgroup)``, so only the first call of a
process pays for them; this script measures that first call. Each round starts a fresh Python process
per case, which builds the model, then times (process CPU time and wall time) ``G.subgroups()``, the
restriction of every declared layer to every listed subgroup (``Declaration.restricted``), the first
``symmetry_spectrum`` afterwards (the plans of the restricted reps and the energies) and a second,
cached one. Prints the median of each over the rounds and the load average at the start and the end.

Cases: ``oh`` two ``nn.Linear`` layers declared under O_h with every irrep of O_h once on each side
(48 x 48), over its 35 listed subgroups; ``oh-all`` the same over its 98 subgroups
(``subgroups(conjugates=True)``); ``o3`` two layers declared under O(3) with degrees up to 3, over
O(3)'s listed subgroups (finite, axial and SO(2)/O(2) about z); ``so3`` the same under SO(3).

    python bench/restriction_first_call.py [--cases oh o3 so3 oh-all] [--rounds 5] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _model(case):
    from torch import nn

    from equiproj.groups import O3, SO3, FullOctahedral, Rep
    from equiproj.nn import declare

    if case in ("oh", "oh-all"):
        G = FullOctahedral()
        r = Rep.parse(G, "A1g + A2g + Eg + T1g + T2g + A1u + A2u + Eu + T1u + T2u")
        m = nn.Sequential(nn.Linear(r.dim, r.dim), nn.Linear(r.dim, r.dim)).double()
        declare(m[0], r, r)
        declare(m[1], r, r)
        return G, m, case == "oh-all"
    if case == "so3":
        G = SO3()
        r0, r1, r2 = Rep.parse(G, "4x0 + 2x1"), Rep.parse(G, "2x0 + 2x1 + 2x2 + 2x3"), Rep.parse(G, "0 + 1 + 2")
    else:
        G = O3()
        r0 = Rep.parse(G, "4x0e + 2x1o + 2x1e")
        r1 = Rep.parse(G, "2x0e + 0o + 1o + 1e + 2e + 2o + 3o + 3e")
        r2 = Rep.parse(G, "0e + 1o + 2e + 0o")
    m = nn.Sequential(nn.Linear(r0.dim, r1.dim), nn.Linear(r1.dim, r2.dim)).double()
    declare(m[0], r0, r1)
    declare(m[1], r1, r2)
    return G, m, False


def worker(case: str) -> dict:
    from equiproj.nn import symmetry_spectrum
    from equiproj.nn._declare import declared_layers

    G, model, every = _model(case)
    out, clock = {}, []

    def mark(name):
        now = (time.process_time(), time.perf_counter())
        if clock:
            out[name] = (now[0] - clock[-1][0], now[1] - clock[-1][1])
        clock.append(now)

    mark("start")
    lattice = G.subgroups(conjugates=True) if every else G.subgroups()
    mark("lattice")
    for H in lattice:
        for _, _, d in declared_layers(model):
            if H.group != G:
                d.restricted(H)
    mark("restrict every layer")
    symmetry_spectrum(model, subgroups=lattice)
    mark("first spectrum after")
    symmetry_spectrum(model, subgroups=lattice)
    mark("cached spectrum")
    out["subgroups"] = len(lattice)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=["oh", "o3", "so3", "oh-all"],
                    choices=["oh", "o3", "so3", "oh-all"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(worker(args.worker)))
        return
    load0 = os.getloadavg()[0]
    results = {}
    for _ in range(args.rounds):  # cases and threads interleaved within each round
        for t in args.threads:
            for case in args.cases:
                env = dict(os.environ, OMP_NUM_THREADS=str(t))
                run = subprocess.run([sys.executable, __file__, "--worker", case], env=env, check=True,
                                     capture_output=True, text=True)
                results.setdefault((case, t), []).append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; medians of {args.rounds} "
          "cold processes, seconds of process CPU time / wall time")
    for (case, t), rows in results.items():
        print(f"\n{case} ({rows[0]['subgroups']} subgroups), {t} thread(s)")
        for step in ("lattice", "restrict every layer", "first spectrum after", "cached spectrum"):
            cpu = statistics.median(r[step][0] for r in rows)
            wall = statistics.median(r[step][1] for r in rows)
            print(f"  {step:<22} {cpu:7.3f} / {wall:7.3f}")


if __name__ == "__main__":
    main()
