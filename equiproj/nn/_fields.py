"""Where the field copies of a representation sit in a tensor's channel axis, and what each field is."""

from __future__ import annotations

import torch

from ..groups import Rep
from ..groups import as_rep as _as_rep

__all__ = ["FieldLayout", "is_permutation_field", "invariant_basis", "as_rep", "refuse_library_module"]


class FieldLayout:
    """The channels of each segment of ``rep`` (``c`` copies of one field of dimension ``d``) in user
    coordinates: ``index[k]`` ``[c, d]`` long, and the inverse permutation to reassemble a tensor.

    ``split(x)`` returns one ``[B, c, d, *rest]`` view (or gather) per segment of a ``[B, C, *rest]``
    tensor; ``merge(parts)`` puts per-segment ``[B, c, d', *rest]`` results back into channel order
    (``d'`` may differ from ``d`` when a block changes the field, e.g. pooling to one channel).

    Copies are numbered in the user's order, the order of their first channels, whatever the
    storage: a rep stored permuted (``33 * (a + b)`` keeps all copies of ``a`` in one segment)
    has its segments' copies interleaved in that order. ``rank[k]`` ``[c]`` is the user number of
    each copy of segment ``k``; per-copy inputs and parameters (gates, biases, scales) are indexed
    by it, so that copy ``i`` of the user's rep always meets entry ``i``.
    """

    def __init__(self, rep: Rep):
        self.rep = rep
        self.fields = [f for _, f in rep.segments]
        self.copies = [c for c, _ in rep.segments]
        user = rep.perm if rep.perm is not None else torch.arange(rep.dim)
        self.index, o = [], 0
        for c, f in rep.segments:
            self.index.append(user[o : o + c * f.dim].reshape(c, f.dim))
            o += c * f.dim
        self.identity = rep.perm is None
        first = torch.cat([idx.min(1).values for idx in self.index]) if self.index else torch.zeros(0, dtype=torch.long)
        rank = torch.empty_like(first)
        rank[torch.argsort(first)] = torch.arange(len(first))
        self.rank = list(torch.split(rank, self.copies))
        #: copies already in user order segment after segment: per-copy entries are plain slices
        self.copies_in_order = bool(torch.equal(rank, torch.arange(len(rank))))

    def per_copy(self, values: torch.Tensor, k: int, dim: int = 0) -> torch.Tensor:
        """The entries of ``values`` (one per copy, in user order, along ``dim``) for segment ``k``'s copies."""
        if self.copies_in_order:
            start = sum(self.copies[:k])
            return values.narrow(dim, start, self.copies[k])
        return values.index_select(dim, self.rank[k].to(values.device))

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] != self.rep.dim:
            raise ValueError(f"the channel axis (dim 1) of x has size {x.shape[1]}, but the rep has dimension "
                             f"{self.rep.dim} ({self.rep!r})")
        rest = x.shape[2:]
        if self.identity:
            sizes = [c * f.dim for c, f in zip(self.copies, self.fields)]
            return [p.reshape((x.shape[0], c, f.dim) + rest)
                    for p, c, f in zip(torch.split(x, sizes, dim=1), self.copies, self.fields)]
        return [x.index_select(1, idx.reshape(-1).to(x.device)).reshape((x.shape[0],) + tuple(idx.shape) + rest)
                for idx in self.index]

    def merge(self, parts: list[torch.Tensor], index: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``parts[k]`` ``[B, c_k, d_k, *rest]`` into ``[B, sum c_k d_k, *rest]``: in the rep's channel order
        (``index=None``, same field dimensions), or in the order of ``index`` (per segment ``[c_k, d_k]``)."""
        flat = torch.cat([p.reshape((p.shape[0], -1) + p.shape[3:]) for p in parts], dim=1)
        order = self.index if index is None else index
        if index is None and self.identity:
            return flat
        position = torch.cat([i.reshape(-1) for i in order]).to(flat.device)
        return flat.index_select(1, torch.argsort(position))


def is_permutation_field(field, group) -> bool:
    """Whether the group acts on the field by permutation matrices (regular, quotient, trivial fields):
    checked at the group's generators (products of permutations are permutations)."""
    M = field.matrix(group.generators())
    return bool(((M.abs() < 1e-9) | ((M - 1).abs() < 1e-9)).all() and ((M.sum(-1) - 1).abs() < 1e-9).all())


def invariant_basis(field, group) -> torch.Tensor:
    """``[d, k]`` orthonormal basis of the vectors the group fixes in the field (its trivial isotypic part)."""
    Q = torch.eye(field.dim, dtype=torch.float64) if field.Q is None else field.Q
    cols, o = [], 0
    trivial = group.trivial()
    for s in field.slots:
        if s == trivial:
            cols.append(Q[:, o : o + s.dim])
        o += s.dim
    return torch.cat(cols, 1) if cols else torch.zeros(field.dim, 0, dtype=torch.float64)


def as_rep(x, name: str) -> Rep:
    """``x`` as a :class:`Rep` (:func:`equiproj.groups.as_rep`: a Rep, an e3nn ``Irreps``, an escnn ``FieldType``
    or ``Representation``)."""
    return _as_rep(x, name)


def refuse_library_module(module, what: str) -> None:
    """Raise ``TypeError`` with what to do for an e3nn or escnn module passed where a plain layer is expected:
    both build their layers equivariant by construction, so there is nothing to declare."""
    lib = type(module).__module__.split(".")[0]
    if lib == "e3nn":
        raise TypeError(f"{what}: e3nn's {type(module).__name__} is equivariant by construction (its weights live in "
                        "an equivariant basis), so there is nothing to declare or penalise; to regularise instead of "
                        "constrain, use a plain nn.Linear declared with Rep.from_e3nn(irreps_in), "
                        "Rep.from_e3nn(irreps_out) (docs/interop.md)")
    if lib == "escnn":
        raise TypeError(f"{what}: escnn's {type(module).__name__} is equivariant by construction; "
                        "equiproj.nn.from_escnn(module) turns it (or a whole escnn model) into declared plain "
                        "PyTorch modules (docs/interop.md)")
