"""The per-step overhead of the projection penalty next to the data-level (augmentation) penalty,
on a small gated O(3) MLP."""

from __future__ import annotations

import torch

from ... import baselines
from ..._energy import energies_and_grads_many, energies_many
from ...groups import O3, Group, Rep
from ...nn import Gate
from ._suite import Settings
from ._timing import Progress, measure


def small_model(G: Group | None = None, seed: int = 0):
    """``(model, reps, rep_in, rep_out)``: a 3-layer O(3) MLP 16x0e+8x1o+4x2e -> 64x0e+32x1o+16x2e (x2) ->
    8x0e+4x1o, gated by :class:`equiproj.nn.Gate` (SiLU on the scalars, a sigmoid gate scalar per vector
    and l=2 field, which the Linear layer before each gate produces as well); ``reps`` are the
    ``(rep_in, rep_out)`` of the three Linear layers."""
    G = G or O3()
    r_in, r_out = Rep.parse(G, "16x0e+8x1o+4x2e"), Rep.parse(G, "8x0e+4x1o")
    gate = lambda: Gate(Rep.parse(G, "64x0e"), Rep.parse(G, "48x0e"), Rep.parse(G, "32x1o+16x2e"))  # noqa: E731
    r_pre, r_h = gate().rep_in, gate().rep_out
    torch.manual_seed(seed)
    lin = lambda a, b: torch.nn.Linear(a.dim, b.dim, bias=False)  # noqa: E731
    model = torch.nn.Sequential(lin(r_in, r_pre), gate(), lin(r_h, r_pre), gate(), lin(r_h, r_out))
    reps = [(r_in, r_pre), (r_h, r_pre), (r_h, r_out)]
    return model, reps, r_in, r_out


def time_overhead(settings: Settings, fused: list[str], gen: torch.Generator, progress: Progress) -> dict:
    """Step time of the small model: plain, + projection penalty, + data-level penalty (K=1)."""
    dev = settings.device
    G = O3()
    model, reps, r_in, r_out = small_model(G, settings.seed)
    model = model.to(dev)
    params = list(model.parameters())
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    B = settings.overhead_batch
    x = torch.randn(B, r_in.dim, generator=gen).to(dev)
    y = torch.randn(B, r_out.dim, generator=gen).to(dev)
    backend = fused[0] if fused else "torch"
    lam = 1e-2

    def plain():
        loss = torch.nn.functional.mse_loss(model(x), y)
        return torch.autograd.grad(loss, params)

    def projection():
        loss = torch.nn.functional.mse_loss(model(x), y)
        e = energies_many(weights, reps, backend=backend)[0]
        return torch.autograd.grad(loss + lam * e.sum(), params)

    weight_index = [next(i for i, p in enumerate(params) if p is w) for w in weights]

    def projection_one_pass():  # what ProjectionPenalty.backward() does: the penalty's gradient added in one pass
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params)
        _, _, pen = energies_and_grads_many(weights, reps, lambda_perp=[lam] * len(weights),
                                            lambda_G=[0.0] * len(weights), backend=backend)
        for i, d in zip(weight_index, pen):
            grads[i].add_(d)
        return grads

    def data():
        fx = model(x)
        loss = torch.nn.functional.mse_loss(fx, y)
        pen = baselines.sampled_data_penalty(model, x, G, act_in=r_in, act_out=r_out, num_samples=1,
                                             generator=gen, fx=fx)
        return torch.autograd.grad(loss + lam * pen, params)

    out = {"model": "O(3) MLP 60 -> 288 -> 240 -> 288 -> 240 -> 20 (3 Linear, 2 Gate)", "batch": B, "backend": backend}
    for name, fn in (("plain", plain), ("projection", projection), ("projection_one_pass", projection_one_pass),
                     ("data_k1", data)):
        progress.step(f"overhead: {name}")
        out[name] = measure(fn, settings, dev)
    t0 = out["plain"]["median_s"]
    out["overhead_projection"] = out["projection"]["median_s"] / t0 - 1
    out["overhead_projection_one_pass"] = out["projection_one_pass"]["median_s"] / t0 - 1
    out["overhead_data_k1"] = out["data_k1"]["median_s"] / t0 - 1
    return out
