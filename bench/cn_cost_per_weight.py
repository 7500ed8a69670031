"""Cost per weight of the one-pass penalty gradient on C_N regular fields against |G| = N.

Times ``equiproj.energies_and_grad(W, rep, rep, lambda_perp=1, out=grad)`` (the gradient added into an
existing buffer) on a ``(n // N) x C_N regular`` weight of about ``n x n`` float32, interleaved round by
round with the warm floor ``torch.mul(W, 2, out=buf)`` of the same tensor; medians. It writes the rows
as JSON, and, given the JSON of another run (``--compare``, e.g. made by the same script on an earlier
commit, whose route builds a dense field-pair basis), plots both routes against N (matplotlib).

    python bench/cn_cost_per_weight.py --json new.json                 # this tree
    python bench/cn_cost_per_weight.py --json new.json --compare old.json --labels orbit basis --plot cn.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import equiproj


def measure(N: int, n: int, rounds: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    rep = max(1, n // N) * equiproj.Cyclic(N).regular()
    gen = torch.Generator().manual_seed(N)
    W = torch.randn(rep.dim, rep.dim, generator=gen)
    grad, buf = torch.zeros_like(W), torch.empty_like(W)
    t0 = time.perf_counter()
    try:
        equiproj.energies_and_grad(W, rep, rep, lambda_perp=1.0, out=grad)
    except (ValueError, MemoryError) as e:  # a route that refuses the size says so
        return {"N": N, "threads": threads, "weights": W.numel(), "refused": str(e).split("\n")[0][:200]}
    first_s = time.perf_counter() - t0
    fns = {"floor": lambda: torch.mul(W, 2, out=buf),
           "route": lambda: equiproj.energies_and_grad(W, rep, rep, lambda_perp=1.0, out=grad)}
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    iqr = {k: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) / med[k] for k, v in times.items()}
    return {"N": N, "threads": threads, "weights": W.numel(), "first_call_s": first_s,
            "ns_per_weight": 1e9 * med["route"] / W.numel(), "x_floor": med["route"] / med["floor"],
            "noisy": max(iqr.values()) > 0.5}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="about n: W is n x n float32")
    p.add_argument("--N", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json", required=True, help="write this run's rows here")
    p.add_argument("--compare", default=None, help="the JSON of another run, plotted beside this one")
    p.add_argument("--labels", nargs=2, default=["this tree", "compared"], help="legend of this run and --compare")
    p.add_argument("--plot", default=None, help="write the plot here (needs matplotlib)")
    a = p.parse_args(argv)
    rows = []
    for N in a.N:
        r = measure(N, a.n, a.rounds, a.threads)
        rows.append(r)
        print(json.dumps(r))
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        runs = [(a.labels[0], rows)] + ([(a.labels[1], json.load(open(a.compare)))] if a.compare else [])
        for label, rs in runs:
            ok = [r for r in rs if "ns_per_weight" in r]
            ax.loglog([r["N"] for r in ok], [r["ns_per_weight"] for r in ok], "o-", label=label)
        ax.set_xlabel("|G| = N (C_N regular fields)")
        ax.set_ylabel("ns per weight (gradient into .grad)")
        ax.set_title(f"W about {a.n} x {a.n} float32, {a.threads} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
