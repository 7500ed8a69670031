"""The symmetry groups, all as subgroups of O(2) or O(3), and their real orthogonal irreps.

Group elements are orthogonal matrices, ``[..., 2, 2]`` or ``[..., 3, 3]``, float64.

Irrep ids (``G.irrep(id)``; ``str(irrep)`` is the string form that ``Rep.parse`` reads):

===================  ==========================  =============================================
group                id                          string form / notes
===================  ==========================  =============================================
``Cyclic(N)``        frequency ``k``, 0..N//2    ``"3"``; k = 0, N/2: 1-dim, real type; else
                                                 2-dim rotation by k*theta, complex type
``SO2()``            frequency ``k >= 0``        as ``Cyclic``
``Dihedral(N)``      ``(j, k)``                  ``"(1,2)"``; (0,0) trivial, (1,0) det, (1,k)
                                                 2-dim for 0 < k < N/2, and for even N the
                                                 1-dim (0,N/2), (1,N/2); all real type
``O2()``             ``(j, k)``                  (0,0), (1,0), (1,k) for k >= 1
``SO3()``            degree ``l >= 0``           ``"2"`` (e3nn's ``"2e"`` is accepted too)
``O3()``             ``(l, p)``, p = +-1         e3nn style ``"2e"`` (p = +1), ``"1o"`` (p = -1)
``Octahedral()``     ``"A1" "A2" "E" "T1" "T2"`` T1 = the defining 3-D action
``FullOctahedral()`` the above + ``"g"``/``"u"`` T1u = the defining 3-D action
===================  ==========================  =============================================

2-D elements are ``R(theta) F^s`` with ``F = diag(1, -1)``; the 2-dim irrep of frequency k
maps it to ``R(k theta) F^s``. SO(3) irreps use the basis of :mod:`equiproj.so3` (e3nn's).
O(3) elements ``g = s R`` (``s = det g``) act by ``p^[s<0] D_l(R)``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Hashable

import numpy as np
import torch

from .so3 import wigner_D

__all__ = [
    "Group",
    "Cyclic",
    "Dihedral",
    "SO2",
    "O2",
    "SO3",
    "O3",
    "Octahedral",
    "FullOctahedral",
]

_F = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)


def _rot2(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _angle_and_det(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``g = R(theta) F^s``: returns (theta, s) with s in {0, 1}."""
    det = g[..., 0, 0] * g[..., 1, 1] - g[..., 0, 1] * g[..., 1, 0]
    return torch.atan2(g[..., 1, 0], g[..., 0, 0]), (det < 0).to(torch.float64)


def _axis_rotation(axis, angle: float) -> torch.Tensor:
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    K = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


class Group:
    """A compact group of orthogonal ``ambient_dim x ambient_dim`` matrices.

    Subclasses define the irreps (``_irrep_ids``, ``_irrep_dim``, ``_irrep_type``,
    ``_irrep_band``, ``_irrep_matrix``, ``_parse_irrep_id``) and elements. Groups compare
    equal when they are the same group (``Cyclic(4) == Cyclic(4)``).
    """

    ambient_dim: int

    # ---- identity -------------------------------------------------------------------------
    def _key(self) -> tuple:
        return (type(self).__name__,)

    def __eq__(self, other) -> bool:
        return isinstance(other, Group) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---- elements -------------------------------------------------------------------------
    @property
    def order(self) -> int | None:
        """Number of elements (``None`` for a continuous group)."""
        return None

    @property
    def is_finite(self) -> bool:
        return self.order is not None

    def identity(self) -> torch.Tensor:
        """``[d, d]`` identity element."""
        return torch.eye(self.ambient_dim, dtype=torch.float64)

    def elements(self) -> torch.Tensor:
        """All elements, ``[|G|, d, d]`` (finite groups only)."""
        raise TypeError(f"{self} is not finite: it has no list of elements; use sample()")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` Haar-random elements, ``[n, d, d]`` float64."""
        els = self.elements()
        idx = torch.randint(len(els), (n,), generator=generator)
        return els[idx]

    def generators(self) -> torch.Tensor:
        """``[k, d, d]`` elements that generate the group (a dense subgroup if continuous)."""
        raise NotImplementedError

    def check_elements(self, g: torch.Tensor, name: str = "g") -> torch.Tensor:
        """Validate that ``g`` holds elements of this group; returns it as float64."""
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of group elements, got {type(g).__name__}")
        d = self.ambient_dim
        if g.dim() < 2 or g.shape[-2:] != (d, d):
            raise ValueError(f"{name} must have shape [..., {d}, {d}] for {self}, got {tuple(g.shape)}")
        if not g.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {g.dtype}")
        g = g.to(torch.float64)
        tol = 1e-6 if g.dtype == torch.float64 else 1e-4
        if g.numel():
            err = (g.transpose(-1, -2) @ g - torch.eye(d, dtype=g.dtype, device=g.device)).abs().amax()
            if not err <= tol:  # also catches NaN
                raise ValueError(f"{name} is not orthogonal (|g^T g - I| = {float(err):.2e})")
            if not self._contains(g):
                raise ValueError(f"{name} contains matrices that are not elements of {self}")
        return g

    def _contains(self, g: torch.Tensor) -> bool:
        return True

    # ---- irreps ---------------------------------------------------------------------------
    def irrep(self, id) -> "Irrep":
        """The irrep with this id (see the module docstring for each group's ids)."""
        from .rep import Irrep

        if isinstance(id, str):
            id = self._parse_irrep_id(id.strip())
        cid = self._canonical_irrep_id(id)
        return Irrep(self, cid)

    def irreps(self, band_limit: int | None = None) -> list["Irrep"]:
        """All irreps (finite groups) or those with frequency/degree ``<= band_limit``."""
        if band_limit is None and not self.is_finite:
            raise ValueError(f"{self} has infinitely many irreps: pass band_limit")
        return [self.irrep(i) for i in self._irrep_ids(band_limit)]

    def trivial(self) -> "Irrep":
        """The 1-dim trivial irrep."""
        return self.irrep(self._trivial_id)

    def standard(self) -> "Rep":
        """The defining action on R^2 or R^3 (``rep.matrix(g) == g``)."""
        from .rep import Rep

        sid = self._standard_irrep_id()
        if sid is not None:  # the defining action is itself one of the irreps
            return self.irrep(sid)
        return Rep.from_matrices(self, lambda g: g, name="standard", band_limit=1)

    def _standard_irrep_id(self):
        return None

    def regular(self) -> "Rep":
        """The left-regular representation (finite groups): ``e_h -> e_{gh}``, ordered as ``elements()``."""
        from .rep import Rep

        if not self.is_finite:
            raise TypeError(f"{self} is continuous: it has no regular representation of finite dimension")
        els = self.elements()
        return Rep.permutation(self, action=lambda g: self.index(g[..., None, :, :] @ els), size=len(els), name="regular")

    def index(self, g: torch.Tensor) -> torch.Tensor:
        """Position of each element of ``g`` in ``elements()`` (finite groups), ``[...]`` long."""
        els = self.elements().to(g.device)
        dist = (g[..., None, :, :] - els).abs().flatten(-2).amax(-1)
        val, idx = dist.min(-1)
        if g.numel() and not val.amax() < 1e-6:
            raise ValueError(f"matrices are not elements of {self}")
        return idx

    # subclass interface
    _trivial_id: Hashable = 0

    def _irrep_ids(self, band_limit):
        raise NotImplementedError

    def _canonical_irrep_id(self, id):
        raise NotImplementedError

    def _parse_irrep_id(self, s: str):
        try:
            return int(s)
        except ValueError:
            raise ValueError(f"malformed irrep {s!r} for {self}") from None

    def _irrep_dim(self, id) -> int:
        raise NotImplementedError

    def _irrep_type(self, id) -> str:
        return "real"

    def _irrep_band(self, id) -> int:
        return 0

    def _irrep_matrix(self, id, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _irrep_str(self, id) -> str:
        return str(id)


# ---------------------------------------------------------------------------------------
# 2-D groups
# ---------------------------------------------------------------------------------------
class _Planar(Group):
    ambient_dim = 2
    reflections = False
    N: int | None = None  # None: continuous

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
        r = _rot2(2 * math.pi * torch.arange(self.N, dtype=torch.float64) / self.N)
        return torch.cat([r, r @ _F]) if self.reflections else r

    def sample(self, n, generator=None):
        if self.N is not None:
            return super().sample(n, generator)
        g = _rot2(2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64))
        if self.reflections:
            flip = torch.rand(n, generator=generator) < 0.5
            g = torch.where(flip[:, None, None], g @ _F, g)
        return g

    def generators(self):
        if self.N is not None:
            gens = [_rot2(torch.tensor(2 * math.pi / self.N, dtype=torch.float64))]
        else:  # angles that are irrational multiples of pi generate a dense subgroup
            gens = [_rot2(torch.tensor(a, dtype=torch.float64)) for a in (1.0, math.sqrt(2.0))]
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

    def _standard_irrep_id(self):
        return 1 if self.N is None or self.N >= 3 else None

    def _irrep_ids(self, band_limit):
        top = self.N // 2 if self.N is not None else band_limit
        if band_limit is not None:
            top = min(top, band_limit)
        return list(range(top + 1))

    def _canonical_irrep_id(self, id):
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
            raise TypeError(f"irrep id for {self} is an int frequency, got {id!r}")
        id = int(id)
        top = self.N // 2 if self.N is not None else None
        if id < 0 or (top is not None and id > top):
            raise ValueError(f"unknown irrep id {id} for {self}: frequencies are 0..{top if top is not None else 'inf'}")
        return id

    def _is_1d(self, k):
        return k == 0 or (self.N is not None and 2 * k == self.N)

    def _irrep_dim(self, k):
        return 1 if self._is_1d(k) else 2

    def _irrep_type(self, k):
        return "real" if self._is_1d(k) else "complex"

    def _irrep_band(self, k):
        return k

    def _irrep_matrix(self, k, g):
        theta, _ = _angle_and_det(g)
        if self._is_1d(k):
            return torch.cos(k * theta)[..., None, None]
        return _rot2(k * theta)


class Cyclic(_PlanarRotations):
    """C_N: rotations of the plane by multiples of 2 pi / N."""

    def __init__(self, N: int):
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
            raise ValueError(f"Cyclic(N) needs an integer N >= 1, got {N!r}")
        self.N = int(N)


class SO2(_PlanarRotations):
    """SO(2): all rotations of the plane."""


class _PlanarReflections(_Planar):
    """Irreps (j, k): (0,0) trivial, (1,0) det, (1,k) 2-dim; even N adds (0,N/2), (1,N/2)."""

    reflections = True
    _trivial_id = (0, 0)

    def _standard_irrep_id(self):
        return (1, 1) if self.N is None or self.N >= 3 else None

    def _irrep_ids(self, band_limit):
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

    def _canonical_irrep_id(self, id):
        if not (isinstance(id, tuple) and len(id) == 2 and all(isinstance(v, (int, np.integer)) for v in id)):
            raise TypeError(f"irrep id for {self} is a pair (j, k) of ints, got {id!r}")
        id = (int(id[0]), int(id[1]))
        if id[1] < 0 or id not in set(self._irrep_ids(id[1])):
            raise ValueError(f"unknown irrep id {id} for {self}")
        return id

    def _parse_irrep_id(self, s):
        t = s.strip("()[] ").split(",")
        try:
            return (int(t[0]), int(t[1])) if len(t) == 2 else None
        except ValueError:
            pass
        raise ValueError(f"malformed irrep {s!r} for {self}: expected '(j,k)'")

    def _irrep_str(self, id):
        return f"({id[0]},{id[1]})"

    def _irrep_dim(self, id):
        j, k = id
        return 1 if k == 0 or (self.N is not None and 2 * k == self.N) else 2

    def _irrep_band(self, id):
        return id[1]

    def _irrep_matrix(self, id, g):
        j, k = id
        theta, s = _angle_and_det(g)
        if self._irrep_dim(id) == 1:
            sign = 1 - 2 * s if j == 1 else torch.ones_like(s)
            return (torch.cos(k * theta) * sign)[..., None, None]
        r = _rot2(k * theta)
        return torch.where(s[..., None, None] > 0, r @ _F, r)


class Dihedral(_PlanarReflections):
    """D_N: the N rotations and N reflections of the regular N-gon (order 2N)."""

    def __init__(self, N: int):
        if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
            raise ValueError(f"Dihedral(N) needs an integer N >= 1, got {N!r}")
        self.N = int(N)


class O2(_PlanarReflections):
    """O(2): all rotations and reflections of the plane."""


# ---------------------------------------------------------------------------------------
# 3-D groups
# ---------------------------------------------------------------------------------------
def _haar_so3(n, generator):
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(n, 3, 3)


def _det3(g):
    return torch.linalg.det(g)


class SO3(Group):
    """SO(3): all rotations of 3-space. Irreps by degree ``l`` (real Wigner D, e3nn's basis)."""

    ambient_dim = 3

    def _standard_irrep_id(self):
        return 1

    def sample(self, n, generator=None):
        return _haar_so3(n, generator)

    def generators(self):
        # rotations by irrational angles about two skew axes generate a dense subgroup
        return torch.stack([_axis_rotation((1.0, 0.3, -0.2), 1.0), _axis_rotation((-0.4, 1.0, 0.7), math.sqrt(2.0))])

    def _contains(self, g):
        return bool((_det3(g) > 0).all())

    def _irrep_ids(self, band_limit):
        return list(range(band_limit + 1))

    def _canonical_irrep_id(self, id):
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or id < 0:
            raise ValueError(f"unknown irrep id {id!r} for {self}: degrees are ints l >= 0")
        return int(id)

    def _parse_irrep_id(self, s):
        if s.endswith("e"):  # e3nn's spelling '2e'
            s = s[:-1]
        return super()._parse_irrep_id(s)

    def _irrep_dim(self, l):
        return 2 * l + 1

    def _irrep_band(self, l):
        return l

    def _irrep_matrix(self, l, g):
        return wigner_D(l, g)


class O3(Group):
    """O(3) = SO(3) x {+-I}. Irreps ``(l, p)``, e3nn strings ``"1o"``, ``"2e"``."""

    ambient_dim = 3
    _trivial_id = (0, 1)

    def _standard_irrep_id(self):
        return (1, -1)

    def sample(self, n, generator=None):
        g = _haar_so3(n, generator)
        s = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
        return g * s[:, None, None]

    def generators(self):
        return torch.cat([SO3().generators(), -torch.eye(3, dtype=torch.float64)[None]])

    def _irrep_ids(self, band_limit):
        return [(l, p) for l in range(band_limit + 1) for p in (1, -1)]

    def _canonical_irrep_id(self, id):
        if not (isinstance(id, tuple) and len(id) == 2) or id[1] not in (1, -1) or not isinstance(id[0], (int, np.integer)) or id[0] < 0:
            raise ValueError(f"unknown irrep id {id!r} for {self}: ids are (l, p) with l >= 0, p = +1 or -1")
        return (int(id[0]), int(id[1]))

    def _parse_irrep_id(self, s):
        if len(s) >= 2 and s[-1] in "eo" and s[:-1].isdigit():
            return (int(s[:-1]), 1 if s[-1] == "e" else -1)
        raise ValueError(f"malformed irrep {s!r} for {self}: expected e3nn style like '1o' or '2e'")

    def _irrep_str(self, id):
        return f"{id[0]}{'e' if id[1] == 1 else 'o'}"

    def _irrep_dim(self, id):
        return 2 * id[0] + 1

    def _irrep_band(self, id):
        return id[0]

    def _irrep_matrix(self, id, g):
        l, p = id
        s = torch.sign(_det3(g))
        D = wigner_D(l, g * s[..., None, None])
        return D * torch.where(s < 0, float(p), 1.0)[..., None, None]


def _signed_permutations(det_sign: int | None) -> torch.Tensor:
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = torch.zeros(3, 3, dtype=torch.float64)
            for i, j in enumerate(perm):
                m[i, j] = signs[i]
            if det_sign is None or round(float(torch.linalg.det(m))) == det_sign:
                mats.append(m)
    return torch.stack(mats)


# Basis of the 2-dim irrep E: the sum-zero plane of R^3 (S_3 permuting the axes)
_E_BASIS = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64).T / torch.tensor(
    [math.sqrt(2.0), math.sqrt(6.0)], dtype=torch.float64
)


def _octahedral_irrep(name: str, R: torch.Tensor) -> torch.Tensor:
    """Irreps of the rotation group O of the cube, evaluated at rotations ``R`` (signed permutations)."""
    perm = R.abs()
    # sign of the axis permutation = det of |R|
    sgn = torch.linalg.det(perm).round()
    if name == "A1":
        return torch.ones_like(sgn)[..., None, None]
    if name == "A2":
        return sgn[..., None, None]
    if name == "E":
        B = _E_BASIS.to(R.device)
        return B.T @ perm @ B
    if name == "T1":
        return R
    if name == "T2":
        return R * sgn[..., None, None]
    raise ValueError(name)


class Octahedral(Group):
    """O: the 24 rotations of the cube (signed permutation matrices, det +1).

    Irreps ``"A1"`` (trivial), ``"A2"`` (sign of the permutation of the axes), ``"E"``
    (2-dim: S_3 permuting the axes, on the plane x+y+z = 0 with basis
    ``(1,-1,0)/sqrt2, (1,1,-2)/sqrt6``), ``"T1"`` (the rotation itself), ``"T2"`` (= A2 x T1).
    """

    ambient_dim = 3
    _trivial_id = "A1"
    _names = ("A1", "A2", "E", "T1", "T2")
    _dims = {"A1": 1, "A2": 1, "E": 2, "T1": 3, "T2": 3}

    @property
    def order(self):
        return 24

    @functools.cached_property
    def _elements(self):
        return _signed_permutations(1)

    def elements(self):
        return self._elements.clone()

    def generators(self):
        return torch.stack([_axis_rotation((0, 0, 1), math.pi / 2).round(), _axis_rotation((1, 1, 1), 2 * math.pi / 3).round()])

    def _contains(self, g):
        return bool(((g.abs() - g.abs().round()).abs() < 1e-6).all() and (_det3(g) > 0).all())

    def _irrep_ids(self, band_limit):
        return list(self._names)

    def _canonical_irrep_id(self, id):
        if id not in self._names:
            raise ValueError(f"unknown irrep id {id!r} for {self}: ids are {', '.join(self._names)}")
        return id

    def _parse_irrep_id(self, s):
        return s

    def _standard_irrep_id(self):
        return "T1" if self._trivial_id == "A1" else "T1u"

    def _irrep_dim(self, id):
        return self._dims[id]

    def _irrep_matrix(self, id, g):
        return _octahedral_irrep(id, g)


class FullOctahedral(Octahedral):
    """O_h = O x {+-I}: the 48 symmetries of the cube (all signed permutation matrices).

    Irreps are those of O with a parity suffix: ``"A1g"`` ... ``"T2u"``; ``g`` is even and
    ``u`` odd under the inversion ``-I``. ``"T1u"`` is the defining 3-D action.
    """

    _trivial_id = "A1g"
    _names = tuple(n + p for p in "gu" for n in Octahedral._names)
    _dims = {n + p: d for p in "gu" for n, d in Octahedral._dims.items()}

    @property
    def order(self):
        return 48

    @functools.cached_property
    def _elements(self):
        return _signed_permutations(None)

    def generators(self):
        return torch.cat([super().generators(), -torch.eye(3, dtype=torch.float64)[None]])

    def _contains(self, g):
        return bool(((g.abs() - g.abs().round()).abs() < 1e-6).all())

    def _irrep_matrix(self, id, g):
        s = torch.sign(_det3(g))
        out = _octahedral_irrep(id[:-1], g * s[..., None, None])
        if id[-1] == "u":
            out = out * s[..., None, None]
        return out
