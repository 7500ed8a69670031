"""Penalty cost per layer as a multiple of the memory floor ("x floor"), permutation-field layers.

For each layer: ``penalty.backward()`` adding into an existing ``.grad`` and ``penalty.decay_(0.01)``
(in place), each divided by a warm ``torch.mul(W, 2, out=buf)`` of the same weight (one read and
one write of W: the least any exact penalty can move). The three are timed interleaved, round after
round, and the medians are reported, on 1 and 2 threads. The layers are those of group CNNs on
regular fields: linear layers on C_N regular fields (N up to 4096: one field pair of 64 MiB), on
O / O_h regular fields, and grid convolutions (C4 / D4 on 5x5 kernels, O / O_h on 3x3x3 kernels),
all of which run the orbit route (docs/math.md §9): no basis, the mean over each orbit.

Run ``python bench/bench_layers.py [--rounds 15] [--threads 1 2] [--layers name,...]
[--device cuda]`` (a couple of minutes on 2 cores; ``--device cuda`` times the Triton kernels, as
bench/gpu_check.sh does). Timings on a shared machine are indicative: the header says so.
CI runs this file with ``--benchmark-disable`` as a test: tiny layers, every path once, checked
against the reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import equiproj
from equiproj.nn import ProjectionPenalty, declare


def _linear(G, field: equiproj.Rep, n: int) -> nn.Module:
    rep = (n // field.dim) * field
    return declare(nn.Linear(rep.dim, rep.dim, bias=False), rep, rep)


def _conv(G, channels: int, k: int, dims: int) -> nn.Module:
    rep = (channels // G.order) * G.regular()
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(rep.dim, rep.dim, k, padding=k // 2, bias=False)
    return declare(conv, rep, rep)


def layers(n: int = 4096, channels2d: int = 384, channels3d: int = 96) -> dict:
    """name -> a function building the declared layer."""
    C, D, O, Oh = equiproj.Cyclic, equiproj.Dihedral, equiproj.Octahedral(), equiproj.FullOctahedral()
    out = {f"Linear {n}², {n // 64} x C64 regular": lambda: _linear(C(64), C(64).regular(), n)}
    for N in (4, 16, 256, 1024, 4096):
        if N <= n:
            out[f"Linear {n}², C{N} regular"] = lambda N=N: _linear(C(N), C(N).regular(), n)
    out[f"Linear ~{n}², O regular"] = lambda: _linear(O, O.regular(), n)
    out[f"Linear ~{n}², O_h regular"] = lambda: _linear(Oh, Oh.regular(), n)
    out[f"Conv2d {channels2d} k=5, C4 regular"] = lambda: _conv(C(4), channels2d, 5, 2)
    out[f"Conv2d {channels2d} k=5, D4 regular"] = lambda: _conv(D(4), channels2d, 5, 2)
    out[f"Conv3d {channels3d} k=3, O regular"] = lambda: _conv(O, channels3d, 3, 3)
    out[f"Conv3d {channels3d} k=3, O_h regular"] = lambda: _conv(Oh, channels3d, 3, 3)
    return out


def measure(layer: nn.Module, rounds: int) -> dict:
    """Medians (seconds) of the floor, backward() into an existing .grad and decay_(0.01), interleaved."""
    model = nn.Sequential(layer)
    penalty = ProjectionPenalty(model, lambda_perp=1e-2)
    W = layer.weight
    W.grad = torch.zeros_like(W)
    buf = torch.empty_like(W)
    sync = torch.cuda.synchronize if W.is_cuda else (lambda: None)  # GPU: time the kernels, not the launch
    with torch.no_grad():
        runs = {
            "floor": lambda: torch.mul(W, 2, out=buf),
            "backward": penalty.backward,
            "decay_": lambda: penalty.decay_(0.01),
        }
        for f in runs.values():  # warm-up: plans, schedules, first touch
            f()
            f()
        times: dict = {k: [] for k in runs}
        for _ in range(rounds):
            for k, f in runs.items():
                sync()
                t = time.perf_counter()
                f()
                sync()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--layers", default=None, help="comma-separated substrings of the layer names")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the Triton orbit kernels; --threads is then ignored)")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        args.threads = args.threads[:1]
    table = layers(args.size)
    if args.layers:
        keys = args.layers.split(",")
        table = {k: v for k, v in table.items() if any(s in k for s in keys)}
    print(f"# x floor (median of {args.rounds} interleaved rounds; floor = warm torch.mul(W, 2, out=buf)); "
          f"torch {torch.__version__}, float32, " + (torch.cuda.get_device_name() if args.device != "cpu" else
                                                     'C++ extension' if equiproj.ops.cpp_available() else 'no extension'))
    print("| layer | weights | threads | floor ms | backward() | decay_ | build s |")
    print("|---|---|---|---|---|---|---|")
    for name, build in table.items():
        t = time.perf_counter()
        torch.manual_seed(0)
        layer = build().to(args.device)
        for th in args.threads:
            torch.set_num_threads(th)
            if th == args.threads[0]:
                ProjectionPenalty(nn.Sequential(layer), lambda_perp=1e-2).backward()  # plan construction, timed once
                built = time.perf_counter() - t
            m = measure(layer, args.rounds)
            print(f"| {name} | {layer.weight.numel() / 1e6:.1f} M | {th} | {m['floor'] * 1e3:.2f} | "
                  f"{m['backward'] / m['floor']:.2f}x | {m['decay_'] / m['floor']:.2f}x | {built:.1f} |", flush=True)


def test_bench_layers_smoke(seed):
    """Every layer kind of the table at a tiny size, once, against the float64 reference."""
    from equiproj import reference
    from equiproj.grid import kernel_rep

    for name, build in layers(n=96, channels2d=16, channels3d=48).items():
        layer = build()
        decl = equiproj.nn.declaration(layer)
        W = layer.weight.detach().double()
        rep_in = decl.rep_in if W.dim() == 2 else decl.rep_in @ kernel_rep(decl.rep_in.group, tuple(W.shape[2:]))
        Wm = W.reshape(W.shape[0], -1)
        want = 2e-2 * (Wm - reference.project(Wm, rep_in, decl.rep_out))
        layer.weight.grad = torch.zeros_like(layer.weight)
        ProjectionPenalty(nn.Sequential(layer), lambda_perp=1e-2).backward()
        torch.testing.assert_close(layer.weight.grad.double().reshape(want.shape), want, atol=1e-6, rtol=1e-5, msg=name)
        measure(layer, rounds=1)


if __name__ == "__main__":
    main()
