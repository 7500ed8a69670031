"""The slowest calls the library accepts, timed: constructors and energy calls at the largest group
orders (512) and degrees (L_MAX = 512) it supports, the large permutation fields (C_N and D_N regular
fields up to N = 65,536, point sets of 4,096 points, a 4096 x 4096 layer on C_4096 regular fields),
and the calls it refuses there (with how long the refusal took). Each call is the first of its kind
in the process (nothing cached); the growth of the process's peak resident memory during the call is
printed beside it (0 where the call stayed below an earlier peak).

    python bench/limits.py [--threads 2] [--out bench/results/limits_cpu.md]

Targets: every accepted call under 10 s on a 2-core machine; ``Cyclic(N).regular()`` and
``Dihedral(N).regular()`` in 0.1 s or less up to N = 65,536 with memory linear in N; a
``Rep.permutation`` of 4,096 points in 1 s or less.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import resource
import time

import torch

import equiproj as ep


def cases():
    g = torch.Generator().manual_seed(0)
    C, D = ep.Cyclic(512), ep.Dihedral(256)
    reg = {}

    def regular(G):
        reg[G] = G.regular()
        return reg[G]

    W512 = torch.randn(512, 512, generator=g)
    first = []  # before the calls whose memory sets the process's peak
    # large permutation fields: closed forms and the group's permutations, no |G| x |G| matrix
    def regular_tables(G):
        (_, field), = G.regular().segments
        return field.permutation.generator_table()  # [generators, |G|]: the rep's only tables

    for N in (4096, 65536):
        for G in (ep.Cyclic(N), ep.Dihedral(N)):
            first.append((f"{G}.regular() and its permutation tables", lambda G=G: regular_tables(G)))
    cube = torch.tensor(list(itertools.product(range(16), repeat=3)), dtype=torch.float64) - 7.5
    square = torch.tensor(list(itertools.product(range(64), repeat=2)), dtype=torch.float64) - 31.5
    first.append(("Rep.permutation, FullOctahedral on the 4,096 points of a 16x16x16 grid",
                  lambda: ep.Rep.permutation(ep.FullOctahedral(), points=cube)))
    first.append(("Rep.permutation, Dihedral(4) on the 4,096 points of a 64x64 grid",
                  lambda: ep.Rep.permutation(ep.Dihedral(4), points=square)))
    W4096 = torch.randn(4096, 4096, generator=g)
    first.append(("energies, Cyclic(4096) regular -> regular, 4096 x 4096 (64 MiB), backend 'cpp'",
                  lambda: ep.energies(W4096, ep.Cyclic(4096).regular(), ep.Cyclic(4096).regular())))
    first.append(("energies, Dihedral(4) on 64x64 points, one 4096-point field each side, backend 'cpp'",
                  lambda: ep.energies(W4096, *(2 * [ep.Rep.permutation(ep.Dihedral(4), points=square)]))))
    out = first + [(f"{C}.regular()", lambda: regular(C)), (f"{D}.regular()", lambda: regular(D))]
    for G in (C, D):
        for backend in ("cpp", "torch", "reference"):
            out.append((f"energies, {G} regular -> regular, 512 x 512, backend {backend!r}",
                        lambda G=G, b=backend: ep.energies(W512, reg[G], reg[G], backend=b)))
        out.append((f"energies, {G} regular ⊗ standard (one field of dimension 1024)",
                    lambda G=G: ep.energies(torch.randn(1024, 1024, generator=g), reg[G] @ G.standard(),
                                            reg[G] @ G.standard())))
    for G, top in ((ep.SO3(), ep.SO3().irrep(512)), (ep.O3(), ep.O3().irrep((512, 1)))):
        W = torch.randn(top.dim, top.dim, generator=g, dtype=torch.float64)
        for backend in ("cpp", "torch", "reference"):
            out.append((f"energies, {G} degree 512 -> 512, backend {backend!r}",
                        lambda top=top, W=W, b=backend: ep.energies(W, top, top, backend=b)))
        seven, eight = (G.irrep(7), G.irrep(8)) if G == ep.SO3() else (G.irrep((7, 1)), G.irrep((8, 1)))
        out.append((f"{G} degree 7 ⊗ 7", lambda a=seven: a @ a))
        out.append((f"{G} degree 8 ⊗ 8", lambda a=eight: a @ a))
    out += [
        ("SO(3) degree 513", lambda: ep.SO3().irrep(513)),
        ("Rep.from_matrices, SO(3) degree 10", lambda: ep.Rep.from_matrices(
            ep.SO3(), lambda x: ep.SO3().irrep(10).matrix(x, check=False))),
        ("FullOctahedral regular ⊗ regular (48 x 48)", lambda: ep.FullOctahedral().regular() @ ep.FullOctahedral().regular()),
        ("Rep.parse(O3, '100000000x0e')", lambda: ep.Rep.parse(ep.O3(), "100000000x0e")),
        ("energies, SO(2) frequency 1e9, backend 'reference'", lambda: ep.energies(
            torch.randn(2, 2, generator=g), ep.SO2().irrep(10**9), ep.SO2().irrep(10**9), backend="reference")),
        ("energies, SO(2) frequency 1e9, backend 'cpp'", lambda: ep.energies(
            torch.randn(2, 2, generator=g), ep.SO2().irrep(10**9), ep.SO2().irrep(10**9))),
    ]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the table (markdown) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, slowest = [], 0.0
    for label, fn in cases():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        t0 = time.perf_counter()
        try:
            fn()
            result = "accepted"
        except ValueError as err:
            result = "refused: " + str(err).split(":")[0][:90]
        dt = time.perf_counter() - t0
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        if result == "accepted":
            slowest = max(slowest, dt)
        rows.append(f"| {label} | {dt:.2f} | {grown:.0f} | {result} |")
        print(rows[-1], flush=True)
    text = "\n".join([f"Slowest calls the library accepts ({platform.machine()}, {torch.get_num_threads()} threads, "
                      f"torch {torch.__version__}); each the first of its kind in the process", "",
                      "| call | seconds | peak memory growth, MiB | result |", "|---|---|---|---|", *rows, "",
                      f"Slowest accepted call: {slowest:.1f} s (target: under 10 s)."])
    print(text.splitlines()[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if slowest < 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
