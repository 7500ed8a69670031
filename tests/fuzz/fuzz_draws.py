"""Hypothesis strategies of the fuzz suite: groups, representations, weights with their layouts.

A representation is drawn as a *recipe*, a nested tuple saying how to build it (irreps with
multiplicities, ``G.regular()``, ``G.standard()``, ``a @ b``, ``a + b``, ``k * a``,
``change_basis``, ``Rep.from_matrices``, ``Rep.permutation``). Recipes are hashable, so a rep is
built once per recipe (and the library's plan cache sees the same object again), and they carry
what the oracle needs to know without asking the library: the dimension and the largest
frequency / degree (``info``). Sizes stay small (dims <= 60, and <= 24 for SO(3) / O(3) whose
oracle is an SVD of ``[2-3 m n, m n]``; group orders <= 48; SO(2) / O(2) frequencies <= 4;
SO(3) / O(3) degrees <= 3), so that an example takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch
from hypothesis import settings
from hypothesis import strategies as st

import equiproj
from equiproj.testing import random_orthogonal

GROUP_KINDS = ("cyclic", "dihedral", "so2", "o2", "so3", "o3", "octahedral", "full_octahedral")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
MAX_BAND = {"so2": 4, "o2": 4, "so3": 3, "o3": 3}
LAYOUTS = ("contiguous", "transposed", "sliced", "batch_permuted", "batch_expanded", "row_broadcast", "col_broadcast")
BATCH_SHAPES = ((), (), (1,), (2,), (3,), (2, 2), (1, 3))


def examples(weight: float) -> int:
    """``weight`` times the ``max_examples`` of the loaded profile (tests/fuzz/conftest.py)."""
    return max(1, round(weight * settings.default.max_examples))


# ---- groups and their irreps (labels, dims, bands: the oracle's own bookkeeping) -------------
@functools.lru_cache(maxsize=None)
def make_group(spec: tuple):
    kind = spec[0]
    if kind == "cyclic":
        return equiproj.Cyclic(spec[1])
    if kind == "dihedral":
        return equiproj.Dihedral(spec[1])
    return {"so2": equiproj.SO2, "o2": equiproj.O2, "so3": equiproj.SO3, "o3": equiproj.O3,
            "octahedral": equiproj.Octahedral, "full_octahedral": equiproj.FullOctahedral}[kind]()


def order(spec) -> int | None:
    return {"cyclic": lambda: spec[1], "dihedral": lambda: 2 * spec[1], "octahedral": lambda: 24,
            "full_octahedral": lambda: 48}.get(spec[0], lambda: None)()


def ambient(spec) -> int:
    return 2 if spec[0] in ("cyclic", "dihedral", "so2", "o2") else 3


_OCT_DIMS = {"A1": 1, "A2": 1, "E": 2, "T1": 3, "T2": 3}


def irrep_ids(spec) -> list:
    kind = spec[0]
    if kind == "cyclic":
        return list(range(spec[1] // 2 + 1))
    if kind == "so2":
        return list(range(MAX_BAND["so2"] + 1))
    if kind in ("dihedral", "o2"):
        top = spec[1] // 2 if kind == "dihedral" else MAX_BAND["o2"]
        ids = [(0, 0), (1, 0)]
        for k in range(1, top + 1):
            ids += [(0, k), (1, k)] if kind == "dihedral" and 2 * k == spec[1] else [(1, k)]
        return ids
    if kind == "so3":
        return list(range(MAX_BAND["so3"] + 1))
    if kind == "o3":
        return [(l, p) for l in range(MAX_BAND["o3"] + 1) for p in (1, -1)]
    if kind == "octahedral":
        return list(_OCT_DIMS)
    return [n + p for p in "gu" for n in _OCT_DIMS]


def irrep_dim(spec, i) -> int:
    kind = spec[0]
    if kind in ("cyclic", "so2"):
        return 1 if i == 0 or (kind == "cyclic" and 2 * i == spec[1]) else 2
    if kind in ("dihedral", "o2"):
        return 1 if i[1] == 0 or (kind == "dihedral" and 2 * i[1] == spec[1]) else 2
    if kind == "so3":
        return 2 * i + 1
    if kind == "o3":
        return 2 * i[0] + 1
    return _OCT_DIMS[i[:-1] if kind == "full_octahedral" else i]


def irrep_band(spec, i) -> int:
    kind = spec[0]
    if kind == "so2":
        return i
    if kind in ("o2", "o3"):
        return i[1] if kind == "o2" else i[0]
    if kind == "so3":
        return i
    return 0


def irrep_string(spec, i) -> str:
    """The irrep as ``Rep.parse`` writes it."""
    kind = spec[0]
    if kind in ("dihedral", "o2"):
        return f"({i[0]},{i[1]})"
    if kind == "o3":
        return f"{i[0]}{'e' if i[1] == 1 else 'o'}"
    return str(i)


# ---- point sets the finite groups permute ----------------------------------------------------
def points(spec, kind: str) -> torch.Tensor:
    if spec[0] in ("cyclic", "dihedral"):
        N = spec[1]
        t = 2 * math.pi * (torch.arange(N, dtype=torch.float64) + (0.5 if kind == "midpoints" else 0.0)) / N
        return torch.stack([torch.cos(t), torch.sin(t)], -1)
    if kind == "faces":
        P = [v for i in range(3) for s in (1.0, -1.0) for v in [[s if j == i else 0.0 for j in range(3)]]]
    elif kind == "vertices":
        P = [list(s) for s in itertools.product((1.0, -1.0), repeat=3)]
    else:  # edge midpoints
        P = [[a if j == i else (b if j == k else 0.0) for j in range(3)]
             for i, k in ((0, 1), (0, 2), (1, 2)) for a in (1.0, -1.0) for b in (1.0, -1.0)]
    return torch.tensor(P, dtype=torch.float64)


def point_kinds(spec) -> dict[str, int]:
    if spec[0] in ("cyclic", "dihedral"):
        return {"vertices": spec[1], "midpoints": spec[1]}
    if spec[0] in ("octahedral", "full_octahedral"):
        return {"faces": 6, "vertices": 8, "edges": 12}
    return {}


# ---- recipes --------------------------------------------------------------------------------
def _kron(g: torch.Tensor) -> torch.Tensor:
    d = g.shape[-1]
    return torch.einsum("...ij,...kl->...ikjl", g, g).reshape(g.shape[:-2] + (d * d, d * d))


def _pseudo(g: torch.Tensor) -> torch.Tensor:
    return g * torch.linalg.det(g)[..., None, None]


#: user functions for Rep.from_matrices: (dim, band) as a function of the ambient dim
MATRIX_FUNCTIONS = {"defining": (lambda d: d, 1), "pseudo": (lambda d: d, 1), "kron": (lambda d: d * d, 2)}


def info(spec, recipe) -> tuple[int, int]:
    """``(dim, band)`` of the rep a recipe builds, from the recipe alone."""
    kind = recipe[0]
    if kind == "irreps":
        return (sum(m * irrep_dim(spec, i) for i, m in recipe[1]),
                max(irrep_band(spec, i) for i, _ in recipe[1]))
    if kind == "regular":
        return order(spec), 0
    if kind == "standard":
        return ambient(spec), 0 if order(spec) else 1
    if kind == "permutation":
        return point_kinds(spec)[recipe[1]], 0
    if kind == "tensor":
        (da, ba), (db, bb) = info(spec, recipe[1]), info(spec, recipe[2])
        return da * db, ba + bb
    if kind == "sum":
        (da, ba), (db, bb) = info(spec, recipe[1]), info(spec, recipe[2])
        return da + db, max(ba, bb)
    if kind == "copies":
        d, b = info(spec, recipe[2])
        return recipe[1] * d, b
    if kind == "basis":
        return info(spec, recipe[1])
    if kind == "matrices":
        fn = recipe[1]
        if fn == "conjugated":
            return info(spec, recipe[2])
        dim, band = MATRIX_FUNCTIONS[fn]
        return dim(ambient(spec)), 0 if order(spec) else band
    raise ValueError(recipe)


@functools.lru_cache(maxsize=1024)
def build(spec, recipe) -> equiproj.Rep:
    """The rep of a recipe (cached: one object per recipe)."""
    G = make_group(spec)
    kind = recipe[0]
    if kind == "irreps":
        terms, style = recipe[1], recipe[2]
        if style == "parse":
            return equiproj.Rep.parse(G, " + ".join(f"{m}x{irrep_string(spec, i)}" if m > 1 else irrep_string(spec, i)
                                                    for i, m in terms))
        return sum(m * G.irrep(i) if m > 1 else G.irrep(i) for i, m in terms)
    if kind == "regular":
        return G.regular()
    if kind == "standard":
        return G.standard()
    if kind == "permutation":
        return equiproj.Rep.permutation(G, points=points(spec, recipe[1]))
    if kind == "tensor":
        return build(spec, recipe[1]) @ build(spec, recipe[2])
    if kind == "sum":
        return build(spec, recipe[1]) + build(spec, recipe[2])
    if kind == "copies":
        return recipe[1] * build(spec, recipe[2])
    if kind == "basis":
        inner, seed, how = recipe[1], recipe[2], recipe[3]
        dim = info(spec, inner)[0]
        gen = torch.Generator().manual_seed(seed)
        if how == "dense":
            Q = random_orthogonal(dim, gen)
        else:  # a signed permutation: a sparse change of basis
            Q = torch.eye(dim, dtype=torch.float64)[torch.randperm(dim, generator=gen)]
            Q = Q * torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
        return build(spec, inner).change_basis(Q)
    if kind == "matrices":
        fn_kind, band_limit = recipe[1], recipe[-1]
        if fn_kind == "conjugated":
            inner_rep = build(spec, recipe[2])
            gen = torch.Generator().manual_seed(recipe[3])
            Q = random_orthogonal(inner_rep.dim, gen)

            def fn(g):
                return Q @ inner_rep.matrix(g) @ Q.T
        else:
            fn = {"defining": lambda g: g, "pseudo": _pseudo, "kron": _kron}[fn_kind]
        return equiproj.Rep.from_matrices(G, fn, band_limit=band_limit)
    raise ValueError(recipe)


@st.composite
def group_specs(draw, kinds=GROUP_KINDS):
    kind = draw(st.sampled_from(kinds))
    if kind == "cyclic":
        return (kind, draw(st.integers(1, 48)))
    if kind == "dihedral":
        return (kind, draw(st.integers(1, 24)))
    return (kind,)


def max_dim_of(spec) -> int:
    return 24 if spec[0] in ("so3", "o3") else 60


@st.composite
def irreps_recipes(draw, spec, max_dim: int, max_band: int):
    ids = [i for i in irrep_ids(spec) if irrep_band(spec, i) <= max_band and irrep_dim(spec, i) <= max_dim]
    terms, budget = [], max_dim
    for _ in range(draw(st.integers(1, 4))):
        cands = [i for i in ids if irrep_dim(spec, i) <= budget]
        if not cands:
            break
        i = draw(st.sampled_from(cands))
        m = draw(st.integers(1, min(6, budget // irrep_dim(spec, i))))
        terms.append((i, m))  # an irrep may come back after others: segments that are not merged
        budget -= m * irrep_dim(spec, i)
    return ("irreps", tuple(terms), draw(st.sampled_from(("parse", "algebra"))))


@st.composite
def rep_recipes(draw, spec, max_dim: int, max_band: int | None = None, depth: int = 2):
    """A recipe of a rep of dim <= ``max_dim`` and band <= ``max_band``."""
    if max_band is None:
        max_band = MAX_BAND.get(spec[0], 0)
    n, amb = order(spec), ambient(spec)
    kinds = ["irreps", "irreps", "matrices"]
    if n is not None and n <= max_dim:
        kinds.append("regular")
    if amb <= max_dim and (n is not None or max_band >= 1):
        kinds.append("standard")
    if any(c <= max_dim for c in point_kinds(spec).values()):
        kinds.append("permutation")
    if depth > 0 and max_dim >= 2:
        kinds += ["tensor", "sum", "copies", "basis"]
    kind = draw(st.sampled_from(kinds))
    if kind == "irreps":
        return draw(irreps_recipes(spec, max_dim, max_band))
    if kind in ("regular", "standard"):
        return (kind,)
    if kind == "permutation":
        return ("permutation", draw(st.sampled_from([k for k, c in point_kinds(spec).items() if c <= max_dim])))
    if kind == "tensor":
        a = draw(rep_recipes(spec, max_dim // 2, max_band, depth - 1))
        da, ba = info(spec, a)
        b = draw(rep_recipes(spec, max_dim // da, max_band - ba, depth - 1))
        return ("tensor", a, b)
    if kind == "sum":
        a = draw(rep_recipes(spec, max_dim - 1, max_band, depth - 1))
        b = draw(rep_recipes(spec, max_dim - info(spec, a)[0], max_band, depth - 1))
        return ("sum", a, b)
    if kind == "copies":
        a = draw(rep_recipes(spec, max_dim // 2, max_band, depth - 1))
        return ("copies", draw(st.integers(2, min(3, max_dim // info(spec, a)[0]))), a)
    if kind == "basis":
        a = draw(rep_recipes(spec, max_dim, max_band, depth - 1))
        return ("basis", a, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(("dense", "signed_permutation"))))
    # from_matrices: a function of g, or the matrices of a drawn rep in a random basis
    fns = [f for f, (dim, band) in MATRIX_FUNCTIONS.items()
           if dim(amb) <= max_dim and (n is not None or band <= max_band)]
    fn = draw(st.sampled_from(fns + ["conjugated"]))
    if fn == "conjugated":
        inner = draw(irreps_recipes(spec, max_dim, max_band))
        band = info(spec, inner)[1]
        recipe = ("matrices", fn, inner, draw(st.integers(0, 2**31 - 1)))
    else:
        band = MATRIX_FUNCTIONS[fn][1]
        recipe = ("matrices", fn)
    # band_limit: the exact band, a larger one, or searched by the library (continuous groups)
    band_limit = None if n is not None else draw(st.sampled_from((None, band, band + 1)))
    return recipe + (band_limit,)


# ---- weights ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One drawn layer: group, reps (recipes), batch shape, layout, dtype, scale, regime, seed and
    the coefficients / incoming gradients of the gradient checks."""

    group: tuple
    rep_in: tuple
    rep_out: tuple
    batch: tuple
    layout: str
    dtype: torch.dtype
    scale_exp: int
    regime: str  # "random", "near" (E_perp / ||W||^2 = ratio) or "equivariant" (W = P(W) before rounding)
    ratio: float
    seed: int
    lambda_perp: object  # float, or a tensor broadcastable to the batch shape
    lambda_G: object

    def __repr__(self):  # what hypothesis prints for a failing case: enough to rebuild it as code
        return (f"LayerCase(group={self.group}, rep_in={self.rep_in}, rep_out={self.rep_out}, batch={self.batch}, "
                f"layout={self.layout!r}, dtype={self.dtype}, scale_exp={self.scale_exp}, regime={self.regime!r}, "
                f"ratio={self.ratio}, seed={self.seed}, lambda_perp={_show(self.lambda_perp)}, "
                f"lambda_G={_show(self.lambda_G)})")


def _show(c):
    return f"torch.tensor({c.tolist()}, dtype=torch.float64)" if isinstance(c, torch.Tensor) else repr(c)


@st.composite
def coefficients(draw, batch: tuple):
    """A lambda: a number, or a float64 tensor broadcastable to ``batch``."""
    if draw(st.booleans()) or not batch:
        return draw(st.sampled_from((0.0, 1.0, -0.5, 2.5, 1e-3)))
    k = draw(st.integers(0, len(batch)))
    shape = batch[len(batch) - k:]
    values = draw(st.lists(st.floats(-3.0, 3.0, allow_nan=False, width=32), min_size=math.prod(shape),
                           max_size=math.prod(shape)))
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


@st.composite
def layer_cases(draw, kinds=GROUP_KINDS, dtypes=FLOAT_DTYPES, max_dim: int | None = None, batch=None,
                batch_shapes=BATCH_SHAPES, layouts=LAYOUTS):
    spec = draw(group_specs(kinds))
    md = min(max_dim or 60, max_dim_of(spec))
    rin = draw(rep_recipes(spec, md))
    rout = draw(rep_recipes(spec, md))
    batch = draw(st.sampled_from(batch_shapes)) if batch is None else batch
    layout = draw(st.sampled_from([x for x in layouts if batch or not x.startswith("batch_")]))
    dtype = draw(st.sampled_from(dtypes))
    scale_exp = draw(st.integers(-2, 2) if dtype == torch.float16 else st.integers(-3, 3))
    regime = draw(st.sampled_from(("random", "random", "near", "equivariant")))
    ratio = draw(st.sampled_from((1e-4, 1e-8))) if regime == "near" else 0.0
    return LayerCase(spec, rin, rout, batch, layout, dtype, scale_exp, regime, ratio,
                     draw(st.integers(0, 2**31 - 1)), draw(coefficients(batch)), draw(coefficients(batch)))


@dataclasses.dataclass
class Layer:
    """A drawn layer made concrete: reps, the weight in its layout, the oracle's projector, the
    regime that applies (``"random"`` where the layout or the reps leave no room for another)."""

    rep_in: equiproj.Rep
    rep_out: equiproj.Rep
    W: torch.Tensor
    P: object
    regime: str

    def reference(self):
        """``(W64, P W, W - P W)`` in float64 for the exact tensor the library sees."""
        W64 = self.W.detach().to(torch.float64)
        PW = self.P(W64)
        return W64, PW, W64 - PW


def materialize(case: LayerCase, projector_for) -> Layer:
    ri, ro = build(case.group, case.rep_in), build(case.group, case.rep_out)
    (_, b_in), (_, b_out) = info(case.group, case.rep_in), info(case.group, case.rep_out)
    assert (ri.dim, ro.dim) == (info(case.group, case.rep_in)[0], info(case.group, case.rep_out)[0])
    P = projector_for(make_group(case.group), ri, ro, b_in, b_out)
    m, n = ro.dim, ri.dim
    gen = torch.Generator().manual_seed(case.seed)
    shape = {"batch_expanded": (m, n), "row_broadcast": case.batch + (1, n),
             "col_broadcast": case.batch + (m, 1)}.get(case.layout, case.batch + (m, n))
    X = torch.randn(shape, dtype=torch.float64, generator=gen)
    regime = case.regime if shape[-2:] == (m, n) else "random"
    if regime != "random":
        PX = P(X)
        if not float(PX.square().sum()) > 1e-20 * float(X.square().sum()):
            regime = "random"  # no equivariant maps between these reps: nothing to be near to
        elif regime == "equivariant":
            X = PX
        else:
            N = torch.randn(shape, dtype=torch.float64, generator=gen)
            N = N - P(N)
            if float(N.square().sum()) > 1e-20 * float(X.square().sum()):
                norms = PX.square().sum((-2, -1), keepdim=True), N.square().sum((-2, -1), keepdim=True)
                s = (case.ratio * norms[0] / norms[1]).sqrt()
                X = PX + s * N
            else:  # every map is equivariant: nothing to be near to
                X, regime = PX, "equivariant"
    X = (X * 10.0**case.scale_exp).to(case.dtype)
    return Layer(ri, ro, apply_layout(X, case.layout, case.batch, m, n), P, regime)


def apply_layout(X: torch.Tensor, layout: str, batch: tuple, m: int, n: int) -> torch.Tensor:
    """The values ``X`` in the memory layout ``layout`` (the result has shape ``batch + (m, n)``)."""
    nb = len(batch)
    if layout == "contiguous":
        return X.contiguous()
    if layout == "transposed":  # column-major matrices
        return X.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other row, every other column, every other batch entry, of a NaN-filled buffer
        big = tuple(2 * b for b in batch[:1]) + batch[1:] + (2 * m + 1, 2 * n + 3)
        buf = torch.full(big, float("nan"), dtype=X.dtype)
        view = buf[(slice(None, None, 2),) * min(nb, 1) + (Ellipsis, slice(1, 2 * m + 1, 2), slice(3, 2 * n + 3, 2))]
        view.copy_(X)
        return view
    if layout == "batch_permuted":  # the batch dims innermost in memory: unit batch stride, column stride = batch size
        Y = X.permute(*range(nb, nb + 2), *range(nb)).contiguous()
        return Y.permute(*range(2, nb + 2), 0, 1)
    if layout == "batch_expanded":  # one matrix, batch stride 0
        return X.expand(batch + (m, n))
    if layout in ("row_broadcast", "col_broadcast"):  # row or column stride 0
        return X.expand(batch + (m, n))
    raise ValueError(layout)
