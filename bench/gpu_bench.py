"""GPU benchmark table of the fused Triton kernel (forward + gradient in one pass over W).

Run by ``bench/gpu_check.sh`` on a CUDA machine; prints one markdown table, last. For each
case (field structure, dtype, weight size) it reports:

* ``fused ms (graph)``: ``fused_energies`` with coefficients (energies + gradient), timed as a
  CUDA-graph replay (the kernel time, without Python launch overhead), median of
  ``triton.testing.do_bench`` (which flushes the L2 before every run);
* ``fused ms (eager)``: the same call from Python, launch overhead included;
* ``GB/s`` and ``% copy``: bytes that must move (read W, write dW) over the graph time, and as a
  fraction of the device-to-device copy bandwidth measured in the same run (bytes read + written);
* ``torch ms`` and ``speedup``: ``equiproj.energies(W, rep_in, rep_out, backend="torch")`` plus
  ``backward`` of ``lambda_perp E_perp + lambda_G E_G`` (the pure-torch path, eager), over fused eager;
* ``rel err``: max relative difference of the fused energies from the torch path's.

``--dry-run`` runs tiny sizes on the CPU under ``TRITON_INTERPRET=1`` (tests this script without
a GPU); ``--sweep`` times tile-size / warp variants of the schedule (for tuning the defaults).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import equiproj  # noqa: E402
from equiproj._plan import block_plan  # noqa: E402
from equiproj.groups import Rep  # noqa: E402


def _import_kernels():
    """``equiproj.kernels``, from the install or, in a bare checkout, from ``<repo>/kernels``."""
    try:
        import equiproj.kernels as k
    except ImportError:
        import importlib.util

        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels")
        spec = importlib.util.spec_from_file_location("equiproj.kernels", os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        k = importlib.util.module_from_spec(spec)
        sys.modules["equiproj.kernels"] = k
        spec.loader.exec_module(k)
    return k


kernels = _import_kernels()


# ---- cases: (name, field dims, rep factory for a target dimension) ------------------------
def _copies(dim, field_dim):
    return max(1, dim // field_dim)


def _so3(s):
    return Rep.parse(equiproj.SO3(), s)


CASES = [
    ("scalars", "1", lambda n: _so3(f"{n}x0")),
    ("SO3 l=1", "3", lambda n: _so3(f"{_copies(n, 3)}x1")),
    ("SO3 l<=2", "1,3,5", lambda n: _so3(" + ".join(f"{_copies(n, 9)}x{l}" for l in range(3)))),
    ("SO2 k=1..4 (complex)", "2", lambda n: Rep.parse(equiproj.SO2(), " + ".join(f"{_copies(n, 8)}x{k}" for k in range(1, 5)))),
    ("C8 regular (r=8)", "8", lambda n: _copies(n, 8) * equiproj.Cyclic(8).regular()),
    ("SO2 1x(0+1) permuted", "2,4", lambda n: Rep.parse(equiproj.SO2(), f"{_copies(n, 6)}x1") @ Rep.parse(equiproj.SO2(), "0 + 1")),
    ("SO3 l=7", "15", lambda n: _so3(f"{_copies(n, 15)}x7")),
    ("D8 regular (r=16)", "16", lambda n: _copies(n, 16) * equiproj.Dihedral(8).regular()),
    ("SO3 l=15", "31", lambda n: _so3(f"{_copies(n, 31)}x15")),
    ("C32 regular (r=32)", "32", lambda n: _copies(n, 32) * equiproj.Cyclic(32).regular()),
]
SMALL_FIELDS = {"scalars", "SO3 l=1", "SO3 l<=2", "SO2 k=1..4 (complex)", "C8 regular (r=8)", "SO3 l=7",
                "D8 regular (r=16)"}  # these run at every size; the others at the first size only


def _bench(fn, device, graph=False):
    """Median milliseconds of ``fn`` (CUDA: do_bench, optionally of a CUDA-graph replay)."""
    if device.type != "cuda":
        fn()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1e3 * statistics.median(ts)
    import triton.testing

    if graph:
        fn()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm the caches on a side stream, as capture requires
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device) -> float:
    """Device-to-device copy, GB/s counting bytes read + written."""
    n = (1 << 30 if device.type == "cuda" else 1 << 22) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _torch_path(W, ri, ro, cp, cg):
    Wg = W.detach().clone().requires_grad_()

    def energies():
        try:
            return equiproj.energies(Wg, ri, ro, backend="torch")
        except TypeError:  # an equiproj without the backend argument
            return equiproj.energies(Wg, ri, ro)

    def step():
        Wg.grad = None
        ep, eg = energies()
        (cp * ep.sum() + cg * eg.sum()).backward()
        return ep, eg

    return step


def run_case(name, dims, factory, dtype, mib, device, copy_bw, with_torch=True):
    el = torch.tensor([], dtype=dtype).element_size()
    n = max(4, int(math.sqrt(mib * 2**20 / el)))
    rep = factory(n)
    W = torch.randn(rep.dim, rep.dim, device=device).to(dtype)
    P = block_plan(rep, rep).packed(device, torch.float32)
    cp = torch.tensor([1.0], device=device)
    cg = torch.tensor([0.25], device=device)

    def fused():
        return kernels.fused_energies([W], [P], cp, cg)

    (ep, eg, g) = fused()
    t_graph = _bench(fused, device, graph=True)
    t_eager = _bench(fused, device)
    moved = 2 * W.numel() * el
    row = {"case": name, "d": dims, "dtype": str(dtype).replace("torch.", ""), "MiB": W.numel() * el / 2**20,
           "graph_ms": t_graph, "eager_ms": t_eager, "GB/s": moved / (t_graph * 1e-3) / 1e9}
    row["%copy"] = 100 * row["GB/s"] / copy_bw
    if with_torch:
        step = _torch_path(W, rep, rep, 1.0, 0.25)
        rp, rg = step()
        row["torch_ms"] = _bench(step, device)
        row["speedup"] = row["torch_ms"] / t_eager
        rel = max(float((ep[0] - rp.detach().float()).abs() / rp.detach().float().abs().clamp_min(1e-30)),
                  float((eg[0] - rg.detach().float()).abs() / rg.detach().float().abs().clamp_min(1e-30)))
        row["rel_err"] = rel
    del W, g
    return row


def format_table(rows, copy_bw, device_name) -> str:
    lines = [f"device: {device_name}; measured copy bandwidth {copy_bw:.0f} GB/s (read + write); "
             "bytes moved = read W + write dW",
             "| case | field d | dtype | MiB | fused ms (graph) | fused ms (eager) | GB/s | % copy | torch ms | speedup | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['d']} | {r['dtype']} | {r['MiB']:.0f} | {r['graph_ms']:.4f} | {r['eager_ms']:.4f} "
                     f"| {r['GB/s']:.0f} | {r['%copy']:.0f}% | {r.get('torch_ms', float('nan')):.3f} "
                     f"| {r.get('speedup', float('nan')):.1f}x | {r.get('rel_err', float('nan')):.1e} |")
    return "\n".join(lines)


def sweep(device, copy_bw, sizes):
    """Tile size / warps variants of the schedule on a few cases (graph-timed GB/s)."""
    from equiproj.kernels import triton_energies

    variants = [(2048, 4), (4096, 4), (8192, 4), (8192, 8), (16384, 8)]
    sizes = sizes[-1:]
    print("| case | MiB | " + " | ".join(f"tile {e} w{w}" for e, w in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for name, dims, factory in CASES:
        if name not in ("scalars", "SO3 l=1", "SO3 l<=2", "C8 regular (r=8)"):
            continue
        for mib in sizes:
            cells = []
            for elems, warps in variants:
                os.environ["EQUIPROJ_TRITON_TILE"], os.environ["EQUIPROJ_TRITON_WARPS"] = str(elems), str(warps)
                triton_energies._SCHEDULES.clear()
                try:
                    r = run_case(name, dims, factory, torch.float32, mib, device, copy_bw, with_torch=False)
                    cells.append(f"{r['GB/s']:.0f}")
                except Exception as e:  # keep sweeping; report the failure in the cell
                    cells.append(f"error {type(e).__name__}")
            print(f"| {name} | {mib} | " + " | ".join(cells) + " |", flush=True)
    os.environ.pop("EQUIPROJ_TRITON_TILE")
    os.environ.pop("EQUIPROJ_TRITON_WARPS")
    triton_energies._SCHEDULES.clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--sweep", action="store_true", help="time tile-size / warp variants first")
    ap.add_argument("--no-table", action="store_true", help="skip the table (with --sweep: tuning only)")
    ap.add_argument("--sizes", default="64,256", help="weight sizes in MiB (float32 cases)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop adding rows after this many seconds")
    args = ap.parse_args(argv)
    if kernels.fused_energies is None:
        print("triton is not importable: nothing to benchmark")
        return 1
    if args.dry_run:
        device, sizes = torch.device("cpu"), [0.002]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --dry-run to test this script on the CPU)")
            return 1
        device, sizes = torch.device("cuda"), [float(s) for s in args.sizes.split(",")]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter, dry run)"
    t0 = time.perf_counter()
    copy_bw = copy_bandwidth(device)
    print(f"copy bandwidth: {copy_bw:.0f} GB/s", flush=True)
    if args.sweep:
        sweep(device, copy_bw, sizes)
    if args.no_table:
        return 0
    plan = []  # (case, dtype, MiB)
    for c in CASES:
        small = c[0] in SMALL_FIELDS
        for mib in sizes if small else sizes[:1]:
            plan.append((c, torch.float32, mib))
    for c in CASES:
        if c[0] in ("scalars", "SO3 l<=2", "C8 regular (r=8)", "SO3 l=7"):
            plan.append((c, torch.bfloat16, sizes[0]))
    if args.dry_run:
        plan = plan[:3] + plan[-1:]
    rows = []
    for (cname, dims, factory), dtype, mib in plan:
        if time.perf_counter() - t0 > args.budget_s:
            print(f"time budget reached: skipping {cname} {dtype} {mib} MiB", flush=True)
            continue
        try:
            rows.append(run_case(cname, dims, factory, dtype, mib, device, copy_bw))
            r = rows[-1]
            print(f"  {cname:22s} {r['dtype']:8s} {r['MiB']:6.0f} MiB  {r['graph_ms']:.4f} ms  {r['GB/s']:.0f} GB/s "
                  f"({r['%copy']:.0f}%)  speedup {r.get('speedup', float('nan')):.1f}x", flush=True)
        except Exception as e:  # one failing case must not hide the others
            print(f"  {cname} {dtype} {mib} MiB failed: {type(e).__name__}: {e}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(format_table(rows, copy_bw, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
