"""Overhead of ProjectionPenalty on one training step of the test CNN (tests/nn/test_nn.py: a lifted
C4 group CNN, conv 1 -> c regular fields -> c regular fields, pool, linear -> '2x0 + 1').

Times a full step (forward, loss, backward, optimizer step) without the penalty, with
``loss + penalty()`` and with ``penalty.backward()`` (the one-pass gradient), interleaved in the
same run, and prints the median times and their ratios to the plain step. Indicative on a
shared machine. Usage: python examples/penalty_overhead.py [--batch 32] [--size 28] [--copies 2]
"""

import argparse
import statistics
import time

import torch
from torch import nn

import equiproj
from equiproj.nn import ProjectionPenalty, declare


def test_cnn(copies: int) -> nn.Sequential:
    G = equiproj.Cyclic(4)
    reg = copies * G.regular()
    c = reg.dim
    model = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4))
    declare(model[0], G.trivial(), reg)
    declare(model[2], reg, reg)
    declare(model[6], reg, equiproj.Rep.parse(G, "2x0 + 1"))
    return model


def measure(batch: int, size: int, copies: int, repeats: int, lambda_perp: float = 1e-2) -> dict:
    torch.manual_seed(0)
    model = test_cnn(copies)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    penalty = ProjectionPenalty(model, lambda_perp=lambda_perp)
    x, y = torch.randn(batch, 1, size, size), torch.randn(batch, 4)

    def step(with_penalty: bool):
        loss = (model(x) - y).square().mean()
        if with_penalty:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_one_pass():  # the penalty's gradient from one fused pass, then the task gradient on top
        opt.zero_grad(set_to_none=True)
        penalty.backward()
        (model(x) - y).square().mean().backward()
        opt.step()

    def penalty_only():
        opt.zero_grad(set_to_none=True)
        penalty().backward()

    fns = {"step": lambda: step(False), "step + penalty": lambda: step(True), "step + penalty.backward()": step_one_pass,
           "penalty fwd+bwd": penalty_only}
    for f in fns.values():  # warm-up (plans, caches)
        for _ in range(3):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so that load changes hit all variants alike
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_w = sum(p.numel() for p in model.parameters())
    return {"batch": batch, "size": size, "copies": copies, "params": n_w, **med,
            "ratio": med["step + penalty"] / med["step"], "ratio_one_pass": med["step + penalty.backward()"] / med["step"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="*", default=[8, 32])
    p.add_argument("--size", type=int, nargs="*", default=[7, 28])
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| batch | image | params | step (ms) | step + penalty() (ms) | ratio | step + penalty.backward() (ms) "
          "| ratio | penalty fwd+bwd alone (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, size in zip(a.batch, a.size):
        r = measure(batch, size, a.copies, a.repeats)
        print(f"| {batch} | {size}x{size} | {r['params']} | {1e3 * r['step']:.2f} | {1e3 * r['step + penalty']:.2f} "
              f"| {r['ratio']:.2f} | {1e3 * r['step + penalty.backward()']:.2f} | {r['ratio_one_pass']:.2f} "
              f"| {1e3 * r['penalty fwd+bwd']:.2f} |")


if __name__ == "__main__":
    main()
