"""pytest-benchmark: the fused CPU op (C++ extension ``equiproj._C``) against the memory floor and
the pure-torch path, forward + backward of ``E_perp + 0.5 E_G``.

The floor, first. Forward + backward of the penalty must read W at least once and write dW once:
``2 * W.numel() * W.element_size()`` bytes. One read-and-write pass over W moves exactly that, so
the floor is the time of ``torch.mul(W, 2)`` (reads W, writes a freshly allocated tensor, as the
backward writes a fresh dW), measured in the same run. The fused op through autograd moves 1.5
such passes: the forward reads W, the backward (the op again, with the incoming gradients as
coefficients) reads W and writes dW. ``equiproj.energies_and_grad`` (the weights 1 and 0.5 known
up front) moves exactly one: it reads W once and writes dW once. ``torch.mul(W, 2, out=buf)`` (no allocation) is also timed, since on some machines
first-touching the fresh output costs as much as the copy itself.

Targets, field dims <= 5 (scalars, vectors, l <= 2), e.g. 4096 x 4096 float32:
fused forward+backward <= 3x ``torch.mul(W, 2)`` and >= 5x faster than the pure-torch path; and a
table of how the ratio grows with the field dimension up to 64 (regular reps of C_N: a dense
N x N basis with r = N per tile, the generic kernel; SO(3) single-l fields: the A = I/sqrt(d) path).

Two more tables: ``--cases kinds`` measures every kind of layer (linear layers on irreps and on
permutation fields, grid and steerable convolutions) through ``ProjectionPenalty.backward()`` into
``.grad`` and ``decay_`` as multiples of the warm floor ``torch.mul(W, 2, out=buf)`` of the same
tensor, on each thread count (:mod:`equiproj.cli.bench._layer_kinds`, also a part of ``equiproj bench``;
``--full`` takes the target sizes); ``--cn N... --routes ROUTE...`` times the cost per weight of the
one-pass gradient into ``.grad`` on C_N regular fields for each route and, with matplotlib, plots it
against |G| = N (``--plot FILE``). A route is ``label=backend`` with optional ``,VAR=value``
environment settings held while it runs (e.g. ``dense=cpp,SOME_SWITCH=0``), so that two routes of
one backend can be compared.

Run ``python bench/bench_fused.py [--size 4096] [--threads 1 2] [--cases fields|growth|kinds|all]
[--no-torch]`` for the table: the baseline and the op are timed in turn, round after round, and the
best of each is kept (ratios from one run; absolute times depend on the machine). Whether the fresh
64 MiB outputs page-fault (glibc returns them to the OS) dominates both ``torch.mul(W, 2)`` and the
backward on some machines: ``THP_MEM_ALLOC_ENABLE=1`` (torch's transparent-huge-page allocation)
removes most of that cost, and the header line says which regime a table was taken in. CI runs this file with
``--benchmark-disable`` as a test: tiny shapes, every path once, fused checked against torch.
"""

from __future__ import annotations

import argparse
import os
import time

import pytest
import torch

import equiproj
from equiproj import ops

C_G = 0.5  # weight of E_G in the benchmarked objective


# ---- cases -----------------------------------------------------------------------------------
def _fill(G, body: str, d: int, n: int) -> equiproj.Rep:
    """``body`` repeated to about n coordinates (copies of a d-dim field), padded with scalars."""
    copies = max(1, n // d)
    rep = equiproj.Rep.parse(G, body.format(c=copies)) if isinstance(body, str) else copies * body
    pad = n - rep.dim
    return rep + equiproj.Rep.parse(G, f"{pad}x0") if pad > 0 else rep


def make_rep(case: str, n: int) -> equiproj.Rep:
    """The rep of a benchmark case with dimension about n (same rep on both sides of W)."""
    so3 = equiproj.SO3()
    if case == "SO(3) 0+1+2":
        c = max(1, n // 9)
        rep = equiproj.Rep.parse(so3, f"{c}x0 + {c}x1 + {c}x2")
        return rep + equiproj.Rep.parse(so3, f"{n - rep.dim}x0") if n > rep.dim else rep
    if case == "SO(3) l=1 (vectors)":
        return _fill(so3, "{c}x1", 3, n)
    if case == "SO(3) l=2":
        return _fill(so3, "{c}x2", 5, n)
    if case == "SO(2) freq 1 (complex type)":
        return _fill(equiproj.SO2(), "{c}x1", 2, n)
    if case.startswith("SO(3) l="):
        l = int(case.split("=")[1])
        return _fill(so3, f"{{c}}x{l}", 2 * l + 1, n)
    if case.startswith("C_") and case.endswith(" regular"):
        N = int(case[2:].split()[0])
        return _fill(equiproj.Cyclic(N), equiproj.Cyclic(N).regular(), N, n)
    raise ValueError(case)


FIELD_CASES = ["SO(3) 0+1+2", "SO(3) l=1 (vectors)", "SO(3) l=2", "SO(2) freq 1 (complex type)"]
GROWTH_CASES = ["C_4 regular", "C_8 regular", "C_16 regular", "C_32 regular", "C_64 regular",
                "SO(3) l=3", "SO(3) l=7", "SO(3) l=15"]
FIELD_DIM = {"SO(3) 0+1+2": "1,3,5", "SO(3) l=1 (vectors)": "3", "SO(3) l=2": "5", "SO(2) freq 1 (complex type)": "2"}


def field_dim(case: str) -> str:
    if case in FIELD_DIM:
        return FIELD_DIM[case]
    if case.startswith("C_"):
        return case[2:].split()[0]
    return str(2 * int(case.split("=")[1]) + 1)


# ---- timed steps -----------------------------------------------------------------------------
def fwd_bwd(W: torch.Tensor, rep, backend: str) -> torch.Tensor:
    W.grad = None
    ep, eg = equiproj.energies(W, rep, rep, backend=backend)
    (ep + C_G * eg).backward()
    return W.grad


def one_pass(W: torch.Tensor, rep, backend: str) -> torch.Tensor:
    """``equiproj.energies_and_grad``: energies and the same gradient from one kernel call."""
    return equiproj.energies_and_grad(W.detach(), rep, rep, lambda_G=C_G, backend=backend)[2]


def into_grad(W: torch.Tensor, grad: torch.Tensor, rep, backend: str) -> torch.Tensor:
    """The same gradient added in place to an existing gradient buffer (no fresh output)."""
    return equiproj.energies_and_grad(W.detach(), rep, rep, lambda_G=C_G, backend=backend, out=grad)[2]


def decay_in_place(W: torch.Tensor, rep, backend: str, rate: float = 1e-3) -> torch.Tensor:
    """The decoupled step ``W <- W - rate (W - P W)``, in place: one read and one write of W."""
    return equiproj.energies_and_grad(W, rep, rep, lambda_perp=-rate / 2, backend=backend, out=W)[2]


def forward(W: torch.Tensor, rep, backend: str):
    with torch.no_grad():
        return equiproj.energies(W, rep, rep, backend=backend)


def timeit(fn, repeat: int = 5, min_time: float = 0.3) -> float:
    """Best wall time of ``repeat`` runs (at least ``min_time`` seconds in total), after a warm-up."""
    fn()
    best, spent, k = float("inf"), 0.0, 0
    while k < repeat or spent < min_time:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent, k = min(best, dt), spent + dt, k + 1
        if k >= 50:
            break
    return best


def interleaved(fns: dict, rounds: int = 7) -> dict:
    """Best wall time of each function over ``rounds`` rounds that run them in turn, so that the
    baseline and the op see the same machine state (a shared machine's load, the allocator's)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def measure(case: str, n: int, threads: int, with_torch: bool = True, dtype=torch.float32) -> dict:
    rep = make_rep(case, n)
    torch.set_num_threads(threads)
    W = torch.randn(rep.dim, rep.dim, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    out = torch.empty_like(W)
    grad = torch.zeros_like(W)
    W_decay = W.detach().clone()
    row = {"case": case, "d": field_dim(case), "shape": tuple(W.shape), "threads": threads}
    row.update(interleaved({
        "mul": lambda: torch.mul(W.detach(), 2),
        "mul_out": lambda: torch.mul(W.detach(), 2, out=out),
        "fused_fwd": lambda: forward(W, rep, "cpp"),
        "fused": lambda: fwd_bwd(W, rep, "cpp"),
        "one_pass": lambda: one_pass(W, rep, "cpp"),
        "into_grad": lambda: into_grad(W, grad, rep, "cpp"),
        "decay": lambda: decay_in_place(W_decay, rep, "cpp"),
    }))
    if with_torch:
        row["torch"] = timeit(lambda: fwd_bwd(W, rep, "torch"), repeat=2, min_time=0.0)
    return row


def format_table(rows: list[dict]) -> str:
    head = ("| case | field dim | W | threads | mul ms | mul(out=) ms | fused fwd+bwd ms | x mul | x mul(out=) | fwd ms "
            "| one pass ms | x mul | into .grad ms | x mul(out=) | decay in place ms | x mul(out=) "
            "| torch fwd+bwd ms | speedup vs torch |")
    lines = [head, "|" + "---|" * 18]
    for r in rows:
        tor = r.get("torch")
        tor_ms = "-" if tor is None else f"{tor * 1e3:.0f}"
        speedup = "-" if tor is None else f"{tor / r['fused']:.1f}x"
        lines.append(
            f"| {r['case']} | {r['d']} | {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {r['mul'] * 1e3:.1f} "
            f"| {r['mul_out'] * 1e3:.1f} | {r['fused'] * 1e3:.1f} | {r['fused'] / r['mul']:.2f} "
            f"| {r['fused'] / r['mul_out']:.2f} | {r['fused_fwd'] * 1e3:.1f} | {r['one_pass'] * 1e3:.1f} "
            f"| {r['one_pass'] / r['mul']:.2f} | {r['into_grad'] * 1e3:.1f} | {r['into_grad'] / r['mul_out']:.2f} "
            f"| {r['decay'] * 1e3:.1f} | {r['decay'] / r['mul_out']:.2f} | {tor_ms} | {speedup} |")
    return "\n".join(lines)


# ---- pytest-benchmark (CI: --benchmark-disable runs each once on tiny shapes) -------------------
needs_cpp = pytest.mark.skipif(not ops.cpp_available(), reason="the C++ extension equiproj._C is not built")


@pytest.fixture(scope="module", params=FIELD_CASES + ["C_16 regular"])
def layer(request):
    full = not request.config.getoption("benchmark_disable", False)
    rep = make_rep(request.param, 4096 if full else 40)
    W = torch.randn(rep.dim, rep.dim, generator=torch.Generator().manual_seed(0)).requires_grad_()
    expected = fwd_bwd(W, rep, "torch").clone()
    return rep, W, expected


def _floor(W) -> float:
    return timeit(lambda: torch.mul(W.detach(), 2), repeat=3, min_time=0.0)


@pytest.mark.benchmark(group="fused-cpu")
def test_floor_mul(benchmark, layer):
    rep, W, _ = layer
    out = benchmark(torch.mul, W.detach(), 2)
    assert out.shape == W.shape


@needs_cpp
@pytest.mark.benchmark(group="fused-cpu")
def test_fused_fwd_bwd(benchmark, layer):
    rep, W, expected = layer
    g = benchmark(fwd_bwd, W, rep, "cpp")
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)
    if not benchmark.disabled:
        benchmark.extra_info["x_mul"] = benchmark.stats.stats.min / _floor(W)


@needs_cpp
@pytest.mark.benchmark(group="fused-cpu")
def test_fused_one_pass(benchmark, layer):
    rep, W, expected = layer
    g = benchmark(one_pass, W, rep, "cpp")
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)


@needs_cpp
@pytest.mark.benchmark(group="fused-cpu")
def test_fused_into_grad_and_decay(benchmark, layer):
    rep, W, expected = layer
    grad = torch.ones_like(W)
    g = benchmark(into_grad, W, grad, rep, "cpp")
    calls = 1 if benchmark.disabled else benchmark.stats.stats.rounds * benchmark.stats.stats.iterations + 1
    torch.testing.assert_close(g, 1 + calls * expected, rtol=1e-4, atol=1e-4 * calls)
    Wd = W.detach().clone()
    decay_in_place(Wd, rep, "cpp", rate=0.5)  # W - (W - P W) / 2 = W - expected_perp / 4 (expected = 2 R + 2 C_G P W)
    R = equiproj.project(W.detach(), rep, rep, which="non_equivariant")
    torch.testing.assert_close(Wd, W.detach() - 0.5 * R, rtol=1e-5, atol=1e-6)


@pytest.mark.benchmark(group="fused-cpu")
def test_torch_fwd_bwd(benchmark, layer):
    rep, W, expected = layer
    g = benchmark.pedantic(fwd_bwd, (W, rep, "torch"), rounds=1 if benchmark.disabled else 3)
    torch.testing.assert_close(g, expected)


# ---- cost per weight against |G| for C_N regular fields, per route ----------------------------
def parse_route(text: str) -> tuple[str, str, dict]:
    """``label=backend[,VAR=value...]`` (or just ``backend``) -> ``(label, backend, env)``."""
    label, _, rest = text.partition("=")
    if not rest:
        return text, text, {}
    backend, *settings = rest.split(",")
    env = dict(kv.split("=", 1) for kv in settings)
    return label, backend, env


def cn_cost_per_weight(ns, routes, size: int, threads: int, rounds: int = 7) -> list[dict]:
    """For each N and route: the median time of ``energies_and_grad(..., out=grad)`` on an n x n
    float32 weight of C_N regular fields (n about ``size``), per weight and as a multiple of the
    warm floor ``torch.mul(W, 2, out=buf)`` timed in the same rounds."""
    torch.set_num_threads(threads)
    rows = []
    for N in ns:
        G = equiproj.Cyclic(N)
        rep = max(1, size // N) * G.regular()
        W = torch.randn(rep.dim, rep.dim, generator=torch.Generator().manual_seed(N))
        grad, buf = torch.zeros_like(W), torch.empty_like(W)
        for text in routes:
            label, backend, env = parse_route(text)
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                times = {"floor": [], "route": []}
                fns = {"floor": lambda: torch.mul(W, 2, out=buf), "route": lambda: into_grad(W, grad, rep, backend)}
                for fn in fns.values():
                    fn()
                for _ in range(rounds):
                    for k, fn in fns.items():
                        t = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            floor, t = sorted(times["floor"])[rounds // 2], sorted(times["route"])[rounds // 2]
            rows.append({"N": N, "route": label, "weights": W.numel(), "threads": threads,
                         "ns_per_weight": 1e9 * t / W.numel(), "x_floor": t / floor})
    return rows


def format_cn(rows: list[dict]) -> str:
    lines = ["| N = abs(G) | route | weights | threads | ns per weight | x floor |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['route']} | {r['weights']:,} | {r['threads']} | {r['ns_per_weight']:.2f} "
                     f"| {r['x_floor']:.1f}x |")
    return "\n".join(lines)


def plot_cn(rows: list[dict], path: str) -> bool:
    """Cost per weight against |G| (log-log), one line per route; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the table above has the same numbers)")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for route in dict.fromkeys(r["route"] for r in rows):
        pts = [(r["N"], r["ns_per_weight"]) for r in rows if r["route"] == route]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=route)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("|G| (C_N regular fields)")
    ax.set_ylabel("ns per weight (gradient into .grad)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096, help="about n: W is n x n float32")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cases", choices=["fields", "growth", "kinds", "all", "none"], default="all",
                   help="field dims <= 5 (every thread count), the growth table (last thread count), every kind "
                        "of layer as x floor (every thread count), all of them, or none (with --cn)")
    p.add_argument("--full", action="store_true", help="layer kinds at the target sizes (slow), not the quick ones")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="layer kinds: only the rows whose name contains one of these texts (e.g. 'D4096' 'band-limited')")
    p.add_argument("--rounds", type=int, default=None, help="layer kinds: interleaved rounds per row (default 7, --full 15)")
    p.add_argument("--no-torch", action="store_true", help="skip the (slow) pure-torch path")
    p.add_argument("--cn", type=int, nargs="*", default=[], help="C_N regular fields: the N of the cost-per-weight table")
    p.add_argument("--routes", nargs="+", default=["cpp"], help="label=backend[,VAR=value...] per route of --cn")
    p.add_argument("--plot", default=None, help="write the --cn plot to this file (needs matplotlib)")
    args = p.parse_args(argv)
    if not ops.cpp_available():
        raise SystemExit(ops._availability.cpp_missing())
    if args.cases in ("kinds", "all"):
        from equiproj.cli.bench._layer_kinds import format_layer_kinds, layer_kind_rows, layer_kinds

        kinds = layer_kinds(quick=not args.full)
        if args.only:
            kinds = [k for k in kinds if any(t in k.name for t in args.only)]
            if not kinds:
                raise SystemExit(f"no layer kind's name contains any of {args.only}")
        print(f"{len(kinds)} layer kinds on {args.threads} thread(s); {os.cpu_count()} CPUs, load average "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
        rows = layer_kind_rows(tuple(args.threads), quick=not args.full, rounds=args.rounds, kinds=kinds,
                               progress=lambda s: print(s, flush=True))
        print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print()
        print(format_layer_kinds(rows))
        print()
    if args.cn:
        cn = cn_cost_per_weight(args.cn, args.routes, args.size, args.threads[0])
        print(format_cn(cn))
        if args.plot:
            plot_cn(cn, args.plot)
    if args.cases in ("kinds", "none"):
        return
    print(f"isa: {torch.ops.equiproj_cpu.isa()}, torch {torch.__version__}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}")
    runs = []
    if args.cases in ("fields", "all"):
        runs += [(case, t) for t in args.threads for case in FIELD_CASES]
    if args.cases in ("growth", "all"):
        runs += [(case, args.threads[-1]) for case in GROWTH_CASES]
    rows = []
    for case, threads in runs:
        rows.append(measure(case, args.size, threads, with_torch=not args.no_torch))
        print(format_table(rows[-1:]).split("\n")[-1], flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
