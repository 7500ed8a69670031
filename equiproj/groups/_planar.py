"""The planar groups: C_N, D_N, SO(2), O(2) (subgroups of O(2), elements ``[..., 2, 2]``).

Elements are ``R(theta) F^s`` with ``F = diag(1, -1)``. Irreps:

* rotations (``Cyclic(N)``, ``SO2()``): frequency ``k`` (``"3"``), 0..N//2 for C_N; k = 0 and
  k = N/2 are 1-dim of real type, every other k is the 2-dim rotation ``R(k theta)``, of complex type;
* with reflections (``Dihedral(N)``, ``O2()``): ``(j, k)`` (``"(1,2)"``): (0,0) trivial, (1,0)
  the determinant, (1,k) 2-dim ``R(k theta) F^s`` for 0 < k (< N/2), and for even N the 1-dim
  (0,N/2), (1,N/2); all of real type.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._group import Group
from ._subgroups import angle_name

__all__ = ["Cyclic", "Dihedral", "SO2", "O2"]

_F = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)


def rot2(theta: torch.Tensor) -> torch.Tensor:
    """``R(theta)`` ``[..., 2, 2]``: rotation by ``theta`` (counter-clockwise in (x, y))."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _check_degree(degree) -> int:
    degree = int(degree)
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    return degree


def _angle_and_det(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``g = R(theta) F^s``: returns (theta, s) with s in {0, 1}."""
    det = g[..., 0, 0] * g[..., 1, 1] - g[..., 0, 1] * g[..., 1, 0]
    return torch.atan2(g[..., 1, 0], g[..., 0, 0]), (det < 0).to(torch.float64)


class _Planar(Group):
    ambient_dim = 2
    reflections = False
    N: int | None = None  # None: continuous

    def _set_order_of_rotations(self, N) -> None:
        """``self.N = N`` for the finite groups (``Cyclic(N)``, ``Dihedral(N)``), checked: an int ``>= 1``."""
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
            raise ValueError(f"{type(self).__name__}(N) needs an integer N >= 1, got {N!r}")
        self.N = int(N)

    def _key(self):
        return (type(self).__name__, self.N)

    def __repr__(self):
        return f"{type(self).__name__}({self.N})" if self.N is not None else f"{type(self).__name__}()"

    @property
    def order(self):
        return None if self.N is None else self.N * (2 if self.reflections else 1)

    def elements(self):
        if self.N is None:
            return super().elements()
        r = rot2(2 * math.pi * torch.arange(self.N, dtype=torch.float64) / self.N)
        return torch.cat([r, r @ _F]) if self.reflections else r

    def sample(self, n, generator=None):
        if self.N is not None:
            return super().sample(n, generator)
        g = rot2(2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64))
        if self.reflections:
            flip = torch.rand(n, generator=generator) < 0.5
            g = torch.where(flip[:, None, None], g @ _F, g)
        return g

    def generators(self):
        if self.N is not None:
            gens = [rot2(torch.tensor(2 * math.pi / self.N, dtype=torch.float64))]
        else:  # angles that are irrational multiples of pi generate a dense subgroup
            gens = [rot2(torch.tensor(a, dtype=torch.float64)) for a in (1.0, math.sqrt(2.0))]
        if self.reflections:
            gens.append(_F)
        return torch.stack(gens)

    def index(self, g):
        theta, s = _angle_and_det(g)
        j = torch.round(theta * self.N / (2 * math.pi)).long() % self.N
        idx = j + self.N * s.long()
        # verify: index() must not silently round a non-member
        if g.numel() and not (self.elements().to(g.device)[idx] - g).abs().amax() < 1e-6:
            raise ValueError(f"matrices are not elements of {self}")
        return idx

    def regular_table(self, idx=None):
        # element k + N s is R(2 pi k / N) F^s; R(a) F^s R(b) F^t = R(a + (-1)^s b) F^(s + t)
        if self.N is None:
            return super().regular_table(idx)
        N, n = self.N, self.order
        if idx is None:
            idx = torch.arange(n)
        a, s = (idx % N)[..., None], (idx // N)[..., None]
        y = torch.arange(n)
        b, t = y % N, y // N
        return (a + (1 - 2 * s) * b) % N + N * ((s + t) % 2)

    def regular_pair_orbits(self):
        if self.N is None:
            return None
        return "dihedral" if self.reflections else "cyclic"

    def haar_quadrature(self, degree):
        if self.N is not None:
            return super().haar_quadrature(degree)
        degree = _check_degree(degree)
        # trapezoid rule with M points integrates e^{ik theta} exactly for |k| < M
        M = degree + 1
        g = rot2(2 * math.pi * torch.arange(M, dtype=torch.float64) / M)
        w = torch.full((M,), 1.0 / M, dtype=torch.float64)
        if self.reflections:
            g, w = torch.cat([g, g @ _F]), torch.cat([w, w]) / 2
        return g, w

    def haar_quadrature_size(self, degree):
        if self.N is not None:
            return super().haar_quadrature_size(degree)
        return (_check_degree(degree) + 1) * (2 if self.reflections else 1)

    def product_may_contain(self, psi, a, b):
        sums = (abs(a.band - b.band), a.band + b.band)  # cos/sin products: frequencies add and subtract
        if self.N is not None:  # ... modulo N, and k and N - k are one irrep
            sums = tuple(min(f % self.N, -f % self.N) for f in sums)
        return psi.band in sums

    def _same_irrep_as(self, psi):
        G = psi.group
        if G.ambient_dim != 2 or not isinstance(G, _Planar):
            return None
        if self.reflections and getattr(self, "axis", 0.0) != getattr(G, "axis", 0.0):
            return None  # the irreps read the rotation part relative to a different reflection
        cand = psi.id if self.reflections else G.irrep_band(psi.id)  # on rotations R(k theta) F^s is R(k theta)
        try:
            cand = self.canonical_irrep_id(cand)
        except (TypeError, ValueError):
            return None  # k is above this group's range: it folds (k mod N), left to the decomposition
        return cand if self.irrep_dim(cand) == psi.dim else None

    def _ambient_harmonic_matrix(self, h):
        ambient = O2()
        return lambda g: ambient.irrep_matrix((1, h), g)

    def _contains(self, g):
        theta, s = _angle_and_det(g)
        if not self.reflections and bool((s > 0).any()):
            return False
        if self.N is None:
            return True
        x = theta * self.N / (2 * math.pi)
        return bool(((x - torch.round(x)).abs() < 1e-6).all())


class _PlanarRotations(_Planar):
    """Irreps by frequency k: 1-dim for k = 0 (and k = N/2), else 2-dim of complex type."""

    def standard_irrep_id(self):
        return 1 if self.N is None or self.N >= 3 else None

    def irrep_ids(self, band_limit):
        top = self.N // 2 if self.N is not None else band_limit
        if band_limit is not None:
            top = min(top, band_limit)
        return list(range(top + 1))

    def canonical_irrep_id(self, id):
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
            raise TypeError(f"irrep id for {self} is an int frequency, got {id!r}")
        id = int(id)
        top = self.N // 2 if self.N is not None else None
        if id < 0 or (top is not None and id > top):
            raise ValueError(f"unknown irrep id {id} for {self}: frequencies are 0..{top if top is not None else 'inf'}")
        return id

    def _harmonic_irrep_id(self, h):
        return h if self.N is None or 2 * h < self.N else None  # the same matrices R(h theta)

    def _is_1d(self, k):
        return k == 0 or (self.N is not None and 2 * k == self.N)

    def irrep_dim(self, k):
        return 1 if self._is_1d(k) else 2

    def irrep_type(self, k):
        return "real" if self._is_1d(k) else "complex"

    def irrep_band(self, k):
        return k

    def irrep_matrix(self, k, g):
        theta, _ = _angle_and_det(g)
        if self._is_1d(k):
            return torch.cos(k * theta)[..., None, None]
        return rot2(k * theta)


class Cyclic(_PlanarRotations):
    """C_N: rotations of the plane by multiples of 2 pi / N."""

    _lists_every_subgroup_class = True

    def __init__(self, N: int):
        self._set_order_of_rotations(N)

    def _subgroup_list(self):
        # the subgroups of a cyclic group: one C_d per divisor d of N
        return [(f"C{d}", Cyclic(d)) for d in _divisors(self.N)]

    def _conjugate_subgroup(self, name, H, g):
        return name, H  # abelian: every subgroup is its own conjugate


class SO2(_PlanarRotations):
    """SO(2): all rotations of the plane."""

    def _subgroup_list(self):
        return [(f"C{m}", Cyclic(m)) for m in range(1, MAX_LISTED_ORDER + 1)] + [("SO2", self)]


class _PlanarReflections(_Planar):
    """Irreps (j, k): (0,0) trivial, (1,0) det, (1,k) 2-dim; even N adds (0,N/2), (1,N/2)."""

    reflections = True
    trivial_id = (0, 0)

    def standard_irrep_id(self):
        return (1, 1) if self.N is None or self.N >= 3 else None

    def irrep_ids(self, band_limit):
        top = self.N // 2 if self.N is not None else band_limit
        if band_limit is not None:
            top = min(top, band_limit)
        ids = [(0, 0), (1, 0)]
        for k in range(1, top + 1):
            if self.N is not None and 2 * k == self.N:
                ids += [(0, k), (1, k)]
            else:
                ids.append((1, k))
        return ids

    def canonical_irrep_id(self, id):
        if not (isinstance(id, tuple) and len(id) == 2 and all(isinstance(v, (int, np.integer)) for v in id)):
            raise TypeError(f"irrep id for {self} is a pair (j, k) of ints, got {id!r}")
        id = (int(id[0]), int(id[1]))
        if id[1] < 0 or id not in set(self.irrep_ids(id[1])):
            raise ValueError(f"unknown irrep id {id} for {self}")
        return id

    def parse_irrep_id(self, s):
        t = s.strip("()[] ").split(",")
        try:
            return (int(t[0]), int(t[1])) if len(t) == 2 else None
        except ValueError:
            pass
        raise ValueError(f"malformed irrep {s!r} for {self}: expected '(j,k)'")

    def irrep_name(self, id):
        return f"({id[0]},{id[1]})"

    def _harmonic_irrep_id(self, h):
        return (1, h) if self.N is None or 2 * h < self.N else None

    def irrep_dim(self, id):
        j, k = id
        return 1 if k == 0 or (self.N is not None and 2 * k == self.N) else 2

    def irrep_band(self, id):
        return id[1]

    def irrep_matrix(self, id, g):
        j, k = id
        theta, s = _angle_and_det(g)
        if self.irrep_dim(id) == 1:
            sign = 1 - 2 * s if j == 1 else torch.ones_like(s)
            return (torch.cos(k * theta) * sign)[..., None, None]
        r = rot2(k * theta)
        return torch.where(s[..., None, None] > 0, r @ _F, r)


class Dihedral(_PlanarReflections):
    """D_N: the N rotations and N reflections of the regular N-gon (order 2N).

    ``axis`` (radians, default 0) places the reflections: the group is generated by ``R(2 pi / N)``
    and the reflection ``f = R(axis) F`` (the mirror line at angle ``axis / 2``), so its elements are
    ``R(2 pi k / N)`` and ``R(2 pi k / N + axis) F``. This is escnn's subgroup id ``(axis, N)`` of
    O(2), written ``r_axis f`` there. The irreps see an element as ``R(phi) f^s``: ``(1, k)`` maps it
    to ``R(k phi) F^s``. The axis is taken modulo ``2 pi / N`` (the same set of elements), so
    ``Dihedral(4, axis=pi / 2)`` holds the reflections ``R(pi / 2) F`` and ``R(3 pi / 2) F`` of D4.
    """

    _lists_every_subgroup_class = True

    def __init__(self, N: int, axis: float = 0.0):
        self._set_order_of_rotations(N)
        axis = float(axis)
        if not math.isfinite(axis):
            raise ValueError(f"Dihedral axis must be a finite angle in radians, got {axis!r}")
        period = 2 * math.pi / self.N
        axis = round(axis % period, 12)
        self.axis = 0.0 if axis >= round(period, 12) else axis

    def _key(self):
        return (type(self).__name__, self.N) + ((self.axis,) if self.axis else ())

    def __repr__(self):
        return f"Dihedral({self.N}, axis={self.axis!r})" if self.axis else f"Dihedral({self.N})"

    def elements(self):
        r = rot2(2 * math.pi * torch.arange(self.N, dtype=torch.float64) / self.N)
        return torch.cat([r, r @ self._flip()])

    def _flip(self) -> torch.Tensor:
        return rot2(torch.tensor(self.axis, dtype=torch.float64)) @ _F

    def generators(self):
        return torch.stack([rot2(torch.tensor(2 * math.pi / self.N, dtype=torch.float64)), self._flip()])

    def _phase(self, g):
        """``g = R(phi) f^s``: (phi, s)."""
        theta, s = _angle_and_det(g)
        return theta - s * self.axis, s

    def index(self, g):
        phi, s = self._phase(g)
        j = torch.round(phi * self.N / (2 * math.pi)).long() % self.N
        idx = j + self.N * s.long()
        if g.numel() and not (self.elements().to(g.device)[idx] - g).abs().amax() < 1e-6:
            raise ValueError(f"matrices are not elements of {self}")
        return idx

    def _contains(self, g):
        phi, _ = self._phase(g)
        x = phi * self.N / (2 * math.pi)
        return bool(((x - torch.round(x)).abs() < 1e-6).all())

    def irrep_matrix(self, id, g):
        if not self.axis:
            return super().irrep_matrix(id, g)
        phi, s = self._phase(g)
        return super().irrep_matrix(id, rot2(phi) @ torch.where(s[..., None, None] > 0, _F, torch.eye(2, dtype=g.dtype)))

    def standard_irrep_id(self):
        return super().standard_irrep_id() if not self.axis else None  # (1, 1) maps f to F, not to R(axis) F

    def _subgroup_list(self):
        # C_d and D_d for each divisor d of N. Conjugating by a rotation of D_N moves a reflection axis
        # by 4 pi / N, so the reflections of D_d fall into one class when N / d is odd and into two
        # (axes a and a + 2 pi / N) when it is even; the representatives share this group's axis, so
        # that D_d[a] ⊂ D_e[a] whenever d divides e.
        out = [(f"C{d}", Cyclic(d)) for d in _divisors(self.N)]
        for d in _divisors(self.N):
            shifts = (0, 1) if (self.N // d) % 2 == 0 else (0,)
            for t in shifts:
                axis = self.axis + t * 2 * math.pi / self.N
                H = self if d == self.N else Dihedral(d, axis=axis)
                name = repr_dihedral(self.N, self.axis) if d == self.N else f"D{d}[{angle_name(H.axis)}]"
                out.append((name, H))
        return out

    def _conjugate_subgroup(self, name, H, g):
        # the rotations C_d are normal; g maps the reflection R(a) F of D_d[a] to g R(a) F g^-1 = R(a') F,
        # whose axis a' names the conjugate
        if not getattr(H, "reflections", False):
            return name, H
        f = g @ H.generators()[-1] @ g.T
        conj = Dihedral(H.N, axis=math.atan2(float(f[1, 0]), float(f[0, 0])))
        return f"D{conj.N}[{angle_name(conj.axis)}]", conj

    def _harmonic_irrep_id(self, h):
        return super()._harmonic_irrep_id(h) if not self.axis else None


class O2(_PlanarReflections):
    """O(2): all rotations and reflections of the plane."""

    def _subgroup_list(self):
        # every reflection axis is conjugate in O(2): one D_M per M, with the reflection F
        return (SO2()._subgroup_list() + [(f"D{m}[0]", Dihedral(m)) for m in range(1, MAX_LISTED_ORDER + 1)]
                + [("O2", self)])


#: the largest rotation order M of the C_M, D_M that SO(2) and O(2) list as subgroups
MAX_LISTED_ORDER = 16


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def repr_dihedral(N: int, axis: float) -> str:
    return f"D{N}" if not axis else f"D{N}[{angle_name(axis)}]"


