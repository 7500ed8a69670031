"""The equivariant blocks against an oracle that applies the representations and compares.

For random groups and representations (drawn as recipes, tests/fuzz/fuzz_draws.py), including
reps stored permuted (``n * a`` with more than 64 segments, kept as one segment per field with a
permutation), random inputs (batched, with and without positions; ordinary, tiny and zero ones,
and samples that are exactly zero), float64 and float32, train and eval modes:

* equivariance: ``block(rho_in(g) x) == rho_out(g) block(x)`` for random group elements ``g``
  (``rho(g)`` = ``rep.matrix(g)`` on the channels; ``equiproj.grid.act`` for ``GridPool``, which
  moves positions);
* the storage does not leak: a block on ``n * a`` (stored permuted) equals the same block, with the
  same parameters, on ``a + a + ... + a`` (stored as written, no permutation);
* everything stays finite: outputs, and the gradients of a random loss (inputs and parameters).
"""

from __future__ import annotations

import functools
import itertools
import operator
import time

import pytest
import torch
from fuzz_draws import (MAX_BAND, build, examples, group_specs, irrep_band, irrep_dim, irrep_ids, make_group, order,
                        point_kinds, rep_recipes)
from fuzz_oracle import RECORD
from hypothesis import example, given, settings
from hypothesis import strategies as st

from equiproj import grid
from equiproj.nn import (FieldBatchNorm, FieldLayerNorm, Gate, GridPool, GroupPooling, NormActivation, NormPooling,
                         PointwiseActivation)

#: relative error per sample of the output, for inputs of ordinary size
RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}
TRIVIAL = {"cyclic": 0, "dihedral": (0, 0), "so2": 0, "o2": (0, 0), "so3": 0, "o3": (0, 1), "octahedral": "A1",
           "full_octahedral": "A1g"}
ANY_FIELD_BLOCKS = ("Gate", "NormActivation", "NormPooling", "FieldBatchNorm", "FieldLayerNorm", "GridPool-avg")
PERMUTATION_BLOCKS = ("PointwiseActivation", "GroupPooling", "GridPool-max")
SCALES = {"ordinary": lambda dt: 1.0, "large": lambda dt: 1e6, "tiny": lambda dt: 1e-150 if dt == torch.float64 else 1e-30,
          "zero": lambda dt: 0.0}


def trivial_recipe(spec, m):
    return ("irreps", ((TRIVIAL[spec[0]], m),), "parse")


@st.composite
def permutation_recipes(draw, spec, max_dim):
    """A rep whose fields the group permutes: regular, permutation, trivial, and sums / copies of them."""
    n = order(spec)
    kinds = ["trivial"]
    if n is not None and n <= max_dim:
        kinds += ["regular", "regular"]
    if n is not None:
        kinds += [("permutation", k) for k, c in point_kinds(spec).items() if c <= max_dim]
    kind = draw(st.sampled_from(kinds))
    if kind == "trivial":
        return trivial_recipe(spec, draw(st.integers(1, 4)))
    if kind == "regular":
        a = ("regular",)
    else:
        a = kind
    if draw(st.booleans()):
        a = ("sum", a, trivial_recipe(spec, draw(st.integers(1, 3))))
    return a


@st.composite
def two_segment_recipes(draw, spec, permutation_only: bool):
    """A small rep (dim <= 6) of two different fields, stored without permutation; ``None`` if the group
    has none of the kind."""
    if permutation_only:
        parts = [k for k, c in point_kinds(spec).items() if c <= 5] if order(spec) is not None else []
        if order(spec) is not None and order(spec) <= 5:
            parts.append("regular")
        if not parts:
            return None
        p = draw(st.sampled_from(parts))
        other = ("regular",) if p == "regular" else ("permutation", p)
        return ("sum", trivial_recipe(spec, 1), other)
    ids = [i for i in irrep_ids(spec) if irrep_dim(spec, i) <= 3 and irrep_band(spec, i) <= MAX_BAND.get(spec[0], 0)]
    if len(ids) < 2:
        return None
    i, j = draw(st.lists(st.sampled_from(ids), min_size=2, max_size=2, unique=True))
    return ("irreps", ((i, 1), (j, 1)), "parse")


@st.composite
def block_reps(draw, spec, permutation_only: bool):
    """``(recipe, twin_recipes)``: a rep, and for a permuted one the list of recipes whose sum (as
    written) is the same rep without permutation."""
    if draw(st.integers(0, 3)) == 0:  # n * a with 2 segments in a, n > 32: more than 64 segments, stored permuted
        a = draw(two_segment_recipes(spec, permutation_only))
        if a is not None:
            n = draw(st.integers(33, 40))
            return ("copies", n, a), [a] * n
    rec = draw(permutation_recipes(spec, 24) if permutation_only else rep_recipes(spec, 24, depth=2))
    return rec, None


@st.composite
def block_cases(draw):
    block = draw(st.sampled_from(ANY_FIELD_BLOCKS + PERMUTATION_BLOCKS))
    spec = draw(group_specs())
    if spec[0] == "cyclic":
        spec = ("cyclic", draw(st.integers(1, 12)))
    elif spec[0] == "dihedral":
        spec = ("dihedral", draw(st.integers(1, 6)))
    recipe, twin = draw(block_reps(spec, block in PERMUTATION_BLOCKS))
    dtype = draw(st.sampled_from((torch.float64, torch.float32)))
    spatial = 0
    if block.startswith("GridPool"):
        spatial = 2 if make_group(spec).ambient_dim == 2 else 3
    elif draw(st.booleans()):
        spatial = draw(st.integers(1, 2))  # positions the channel action does not move
    return dict(block=block, spec=spec, recipe=recipe, twin=twin, dtype=dtype, spatial=spatial,
                batch=draw(st.integers(2, 3)), scale=draw(st.sampled_from(tuple(SCALES))),
                zero_sample=draw(st.booleans()), training=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                options=draw(st.integers(0, 3)))


def make_block(case, rep):
    G, kind, opt = rep.group, case["block"], case["options"]
    if kind == "Gate":
        scalars = build(case["spec"], trivial_recipe(case["spec"], 1 + opt))
        copies = sum(c for c, _ in rep.segments)
        gates = build(case["spec"], trivial_recipe(case["spec"], copies))
        return Gate(scalars, gates, rep)
    if kind == "NormActivation":
        return NormActivation(rep, act=(torch.sigmoid, torch.relu)[opt % 2], normalize=opt >= 2,
                              eps=(0.0, 1e-6)[opt % 2])
    if kind == "NormPooling":
        return NormPooling(rep, eps=(0.0, 0.0, 1e-4, 1e-8)[opt])
    if kind == "FieldBatchNorm":
        return FieldBatchNorm(rep, affine=opt != 3)
    if kind == "FieldLayerNorm":
        return FieldLayerNorm(rep, affine=opt != 3)
    if kind == "PointwiseActivation":
        return PointwiseActivation(rep, act=(torch.relu, torch.tanh, torch.nn.functional.silu, torch.abs)[opt])
    if kind == "GroupPooling":
        return GroupPooling(rep, reduction=("max", "mean")[opt % 2])
    mode = kind.split("-")[1]
    return GridPool(rep, case["spatial"], kernel_size=(1, 3, 2, 3)[opt], stride=(1, 1, 2, 2)[opt],
                    padding=(0, 1, 0, 0)[opt], mode=mode)


def grid_elements(G, spatial):
    """The signed permutation matrices in ``G``: they map a cubic grid onto itself."""
    out = []
    for perm in itertools.permutations(range(spatial)):
        for signs in itertools.product((1.0, -1.0), repeat=spatial):
            m = torch.zeros(spatial, spatial, dtype=torch.float64)
            for i, j in enumerate(perm):
                m[i, j] = signs[i]
            try:
                G.check_elements(m)
            except ValueError:
                continue
            out.append(m)
    return torch.stack(out)


def act(x, rep, g, moves_positions):
    if moves_positions:
        return grid.act(x, g, rep)
    R = rep.matrix(g).to(x)
    return torch.movedim(torch.movedim(x, 1, -1) @ R.T, -1, 1)


def sample_norms(t):
    """Per-sample Frobenius norms in float64, scaled so that tiny values do not underflow."""
    t = t.detach().double().flatten(1)
    s = t.abs().amax(1, keepdim=True).clamp_min(1e-300)
    return (t / s).norm(dim=1) * s.squeeze(1)


def randomize_parameters(block, gen):
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 + (1.0 if name == "weight" else 0.0))


#: found by the long profile: the direction x / |x| of a tiny float32 copy (its gradient overflowed)
_TINY_NORMALIZED = dict(block="NormActivation", spec=("so2",), recipe=("irreps", ((0, 1),), "parse"), twin=None,
                        dtype=torch.float32, spatial=0, batch=2, scale="tiny", zero_sample=False, training=False,
                        seed=0, options=2)


@settings(max_examples=examples(4.0))
@given(case=block_cases())
@example(case=_TINY_NORMALIZED)
def test_block_equivariance(case):
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(case["seed"])
    spec, dtype = case["spec"], case["dtype"]
    G = make_group(spec)
    rep = build(spec, case["recipe"])
    block = make_block(case, rep).to(dtype)
    randomize_parameters(block, gen)
    moves = case["block"].startswith("GridPool")
    size = {0: (), 1: (3,), 2: (3, 2), 3: (3, 3, 3)}[case["spatial"]]
    if moves:
        size = (5,) * case["spatial"] if case["spatial"] == 2 else (3,) * 3
        if case["options"] == 2:
            size = tuple(s + 1 for s in size)  # even sizes for stride 2, kernel 2
    B = case["batch"]
    x = (torch.randn((B, block.rep_in.dim) + size, generator=gen, dtype=torch.float64)
         * SCALES[case["scale"]](dtype)).to(dtype)
    if case["zero_sample"]:
        x[0] = 0
    if isinstance(block, FieldBatchNorm) and not case["training"]:
        block.train()
        with torch.no_grad():  # running statistics from a few batches
            for _ in range(2):
                block(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype))
    block.train(case["training"])
    y = block(x)
    assert y.shape[1] == block.rep_out.dim and torch.isfinite(y).all()
    els = grid_elements(G, case["spatial"]) if moves else G.sample(3, generator=gen)
    ynorm = sample_norms(y)
    worst = 0.0
    for g in els:
        gy = block(act(x, block.rep_in, g, moves))
        target = act(y, block.rep_out, g, moves)
        err = sample_norms(gy.double() - target.double())
        ref = torch.maximum(ynorm, sample_norms(gy))
        rel = torch.where(ref > 0, err / ref.clamp_min(1e-300), err)
        worst = max(worst, float(rel.max()))
    RECORD.error(("block equivariance", case["block"], str(dtype).removeprefix("torch."), case["scale"]), worst, 0.0)
    assert worst <= RTOL[dtype], (case["block"], rep, worst)

    # the gradients of a random loss are finite, also at zero samples and zero norms
    xg = x.detach().clone().requires_grad_(True)
    out = block(xg)
    (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)).sum().backward()
    assert torch.isfinite(xg.grad).all(), case["block"]
    for p in block.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), case["block"]

    if case["twin"] is not None:  # the storage does not leak into the values
        plain = functools.reduce(operator.add, [build(spec, r) for r in case["twin"]])
        assert plain.perm is None and plain.dim == rep.dim
        twin = make_block(case, plain).to(dtype)
        with torch.no_grad():
            for name, p in block.named_parameters():
                getattr(twin, name).copy_(p)
            # batch statistics: the running ones are kept per segment, which the two storages split differently
            mode = case["training"] or isinstance(block, FieldBatchNorm)
            block.train(mode)
            twin.train(mode)
            ya, yb = block(x), twin(x)
        err = float((sample_norms(ya.double() - yb.double()) / sample_norms(yb).clamp_min(1e-300)).max())
        RECORD.error(("permuted storage", case["block"], str(dtype).removeprefix("torch."), case["scale"]), err, 0.0)
        assert err <= RTOL[dtype], (case["block"], rep, err)
    RECORD.example("test_block_equivariance", time.perf_counter() - t0)

