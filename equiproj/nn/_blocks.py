"""Equivariant building blocks: nonlinearities, normalisations and poolings that keep a network equivariant.

A declared (and projected) linear layer is equivariant; the network is equivariant only if the
blocks between the layers are too. Each block takes a tensor ``[B, C]`` or ``[B, C, *spatial]``
whose channel axis (dim 1) carries ``rep_in`` and returns one carrying ``rep_out`` (attributes of
every block, so that :func:`equiproj.nn.check_equivariance` can follow the representation
through a network). Which block suits which field:

=========================  ==================================================================
block                      equivariant for
=========================  ==================================================================
``PointwiseActivation``    permutation fields only (regular, quotient, trivial): any
                           elementwise function commutes with permuting the channels
``Gate``                   any fields: scalars (1-dim) pass an activation, each other field
                           is multiplied by a sigmoid of its own invariant gate scalar
``NormActivation``         any fields: each field copy is scaled by a function of its norm
``FieldBatchNorm``         any fields: per field copy, the invariant part's mean is removed and
``FieldLayerNorm``         the copy is divided by its RMS norm (over the batch, or per sample)
``GroupPooling``           permutation fields: max (or mean) over each copy's channels
``NormPooling``            any fields: the norm of each copy
``GridPool``               any rep (``"avg"``) / permutation fields (``"max"``), on grids whose
                           size keeps the pooling windows centred (see below)
=========================  ==================================================================

Strided operations on grids (``GridPool``, strided convolutions). A window of size ``k``
(dilated: ``K = d (k - 1) + 1``), stride ``s`` and padding ``p`` along an axis of length ``n``
has its centres symmetric about the centre of the axis exactly when ``(n + 2p - K) % s == 0``;
only then does the operation commute with the grid's rotations and reflections about its
centre (:func:`centred_grid`). For example a stride-2 3x3 conv with padding 1 keeps the symmetry
on 33x33 inputs but not on 32x32 ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import Rep
from ._fields import FieldLayout, as_rep, invariant_basis, is_permutation_field

__all__ = ["PointwiseActivation", "Gate", "NormActivation", "FieldBatchNorm", "FieldLayerNorm", "GroupPooling",
           "NormPooling", "GridPool", "centred_grid"]


def _check_x(x: torch.Tensor, rep: Rep, what: str) -> None:
    if x.dim() < 2 or x.shape[1] != rep.dim:
        raise ValueError(f"{what} takes [B, {rep.dim}] or [B, {rep.dim}, *spatial] tensors (the channel axis carries "
                         f"{rep!r}), got shape {tuple(x.shape)}")


def _copies_scale(part: torch.Tensor) -> torch.Tensor:
    """``[B, c, 1, *rest]``: the largest entry of each field copy (1 for a zero copy), detached."""
    s = part.detach().abs().amax(2, keepdim=True)
    return torch.where(s > 0, s, torch.ones_like(s))


def _copies_norm(part: torch.Tensor, eps: float, s: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, c, 1, *rest]``: the norm of each field copy of a ``[B, c, d, *rest]`` segment, at least ``eps``.

    Computed as ``s |x / s|`` with ``s`` the copy's largest entry (detached: the product does not
    depend on ``s``), so that tiny copies do not underflow to a zero norm; a zero copy has norm 0
    and gradient 0 there (a subgradient of the norm), never NaN.
    """
    s = _copies_scale(part) if s is None else s
    sq = (part / s).square().sum(2, keepdim=True)
    nonzero = sq > 0
    norm = torch.where(nonzero, s * torch.where(nonzero, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    return norm.clamp_min(eps) if eps > 0 else norm


def _safe_divisor(norm: torch.Tensor) -> torch.Tensor:
    """``norm`` with zeros replaced by ones: dividing a zero copy by it gives 0 (and a finite gradient)."""
    return torch.where(norm > 0, norm, torch.ones_like(norm))


class PointwiseActivation(nn.Module):
    """``act(x)`` elementwise, for representations that permute the channels (regular, quotient and
    trivial fields of finite groups; trivial fields of any group), like escnn's
    ``PointwiseNonLinearity``. Any other field raises: use :class:`Gate` or :class:`NormActivation`."""

    def __init__(self, rep: Rep, act=F.relu):
        super().__init__()
        rep = as_rep(rep, "rep")
        bad = [f.name for f in FieldLayout(rep).fields if not is_permutation_field(f, rep.group)]
        if bad:
            raise ValueError(f"a pointwise activation is equivariant only for fields the group permutes (regular, "
                             f"quotient, trivial); {rep!r} has the fields {bad}: use equiproj.nn.Gate or "
                             "equiproj.nn.NormActivation for them")
        self.rep_in = self.rep_out = rep
        self.act = act

    def forward(self, x):
        _check_x(x, self.rep_in, type(self).__name__)
        return self.act(x)


class Gate(nn.Module):
    """The gated nonlinearity (e3nn's ``Gate``, escnn's ``GatedNonLinearity1``).

    The input carries ``rep_scalars + rep_gates + rep_gated``; the output ``rep_scalars + rep_gated``:
    each scalar passes ``act_scalars``, and each copy of a gated field is multiplied by
    ``act_gates`` of its own gate scalar (one gate per copy of ``rep_gated``, in the order of the
    copies in ``rep_gated``'s channels, however the rep is stored).

    Args:
        rep_scalars: 1-dim fields. Trivial ones take any ``act_scalars``; non-trivial 1-dim fields
            (e.g. O(3)'s ``"0o"``) need an odd activation (``tanh``), which keeps them equivariant.
        rep_gates: trivial fields, one per copy of a field of ``rep_gated``.
        rep_gated: any fields.

    Example::

        >>> import torch, equiproj
        >>> from equiproj import Rep
        >>> from equiproj.nn import Gate
        >>> G = equiproj.O3()
        >>> gate = Gate(Rep.parse(G, "8x0e"), Rep.parse(G, "4x0e"), Rep.parse(G, "4x1o"))
        >>> gate(torch.randn(2, gate.rep_in.dim)).shape
        torch.Size([2, 20])
    """

    def __init__(self, rep_scalars: Rep, rep_gates: Rep, rep_gated: Rep, act_scalars=F.silu, act_gates=torch.sigmoid):
        super().__init__()
        rep_scalars, rep_gates, rep_gated = (as_rep(r, n) for r, n in ((rep_scalars, "rep_scalars"),
                                                                        (rep_gates, "rep_gates"),
                                                                        (rep_gated, "rep_gated")))
        G = rep_gated.group
        if not (rep_scalars.group == rep_gates.group == G):
            raise ValueError("rep_scalars, rep_gates and rep_gated must be representations of one group")
        trivial = G.trivial()
        if any(f.dim != 1 for _, f in rep_scalars.segments):
            raise ValueError(f"rep_scalars must consist of 1-dim fields, got {rep_scalars!r}")
        if not all(f.slots == (trivial,) for _, f in rep_gates.segments):
            raise ValueError(f"rep_gates must consist of trivial fields (an invariant gate per gated field), got "
                             f"{rep_gates!r}")
        copies = sum(c for c, _ in rep_gated.segments)
        if rep_gates.dim != copies:
            raise ValueError(f"one gate per copy of a gated field: rep_gated has {copies} field copies, rep_gates "
                             f"has {rep_gates.dim} scalars")
        if any(f.slots != (trivial,) for _, f in rep_scalars.segments):
            t = torch.linspace(-3, 3, 13, dtype=torch.float64)
            if not torch.allclose(act_scalars(-t), -act_scalars(t), atol=1e-6):
                raise ValueError(f"rep_scalars {rep_scalars!r} has non-trivial 1-dim fields (they change sign under "
                                 "some elements): act_scalars must then be odd, e.g. torch.tanh")
        self.rep_scalars, self.rep_gates, self.rep_gated = rep_scalars, rep_gates, rep_gated
        self.rep_in = rep_scalars + rep_gates + rep_gated
        self.rep_out = rep_scalars + rep_gated
        self.act_scalars, self.act_gates = act_scalars, act_gates
        self._gated = FieldLayout(rep_gated)

    def forward(self, x):
        _check_x(x, self.rep_in, "Gate")
        s, g, v = torch.split(x, [self.rep_scalars.dim, self.rep_gates.dim, self.rep_gated.dim], dim=1)
        gates = self.act_gates(g)  # one per copy of rep_gated, in the user's order of the copies
        parts = [part * self._gated.per_copy(gates, k, dim=1).unsqueeze(2)
                 for k, part in enumerate(self._gated.split(v))]
        return torch.cat([self.act_scalars(s), self._gated.merge(parts)], dim=1)


class NormActivation(nn.Module):
    """Each field copy scaled by a function of its norm (e3nn's ``NormActivation``, escnn's
    ``NormNonLinearity``): ``x_f * act(|x_f| + b_f)`` (``normalize=False``) or
    ``x_f * act(|x_f| + b_f) / |x_f|`` (``normalize=True``, with ``act=relu`` escnn's norm-ReLU). The
    norm is invariant, so this is equivariant for every field; ``b`` is a learnable bias per copy
    (in the user's order of the copies). A zero copy stays zero with a finite gradient, whatever
    ``eps`` (the norm is at least ``eps``)."""

    def __init__(self, rep: Rep, act=torch.sigmoid, bias: bool = True, normalize: bool = False, eps: float = 1e-6):
        super().__init__()
        rep = as_rep(rep, "rep")
        self.rep_in = self.rep_out = rep
        self.act, self.normalize, self.eps = act, normalize, eps
        self._layout = FieldLayout(rep)
        n = sum(self._layout.copies)
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        _check_x(x, self.rep_in, "NormActivation")
        out = []
        for k, (part, c) in enumerate(zip(self._layout.split(x), self._layout.copies)):
            scale_of_copy = _copies_scale(part)
            norm = _copies_norm(part, self.eps, scale_of_copy)
            arg = norm
            if self.bias is not None:
                b = self._layout.per_copy(self.bias, k)
                arg = norm + b.reshape((1, c, 1) + (1,) * (part.dim() - 3)).to(norm.dtype)
            scale = self.act(arg)
            if self.normalize:  # the direction from scaled copies: 1 / |x|^2 in the gradient would overflow
                out.append(part / scale_of_copy / _safe_divisor(norm / scale_of_copy) * scale)
            else:
                out.append(part * scale)
        return self._layout.merge(out)


class _FieldNorm(nn.Module):
    """Per field copy: remove the mean of the invariant part, divide by an RMS norm, scale per copy and
    add a bias in the invariant subspace (scales and biases copy by copy in the user's order)."""

    def __init__(self, rep: Rep, eps: float, affine: bool):
        super().__init__()
        rep = as_rep(rep, "rep")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a number > 0 (it keeps the division by the RMS finite for zero inputs, "
                             f"e.g. padding), got {eps!r}")
        self.rep_in = self.rep_out = rep
        self.eps = eps
        self._layout = FieldLayout(rep)
        self._bases = [invariant_basis(f, rep.group) for f in self._layout.fields]  # [d, k] float64
        self._projectors = [U @ U.T for U in self._bases]
        self._cache: dict = {}
        n = sum(self._layout.copies)
        k_inv = sum(c * U.shape[1] for c, U in zip(self._layout.copies, self._bases))
        self.weight = nn.Parameter(torch.ones(n)) if affine else None
        self.bias = nn.Parameter(torch.zeros(k_inv)) if affine and k_inv else None
        # the bias entries of each segment's copies [c, k]: copy by copy in the user's order
        k_of_rank = torch.zeros(n, dtype=torch.long)
        for rank, U in zip(self._layout.rank, self._bases):
            k_of_rank[rank] = U.shape[1]
        start = torch.cumsum(k_of_rank, 0) - k_of_rank
        self._bias_index = [start[rank][:, None] + torch.arange(U.shape[1]) for rank, U in
                            zip(self._layout.rank, self._bases)]

    def _invariant_mean(self, k, part, dims):
        """The mean of ``part`` ``[B, c, d, *rest]`` over ``dims``, projected on the invariant subspace."""
        mean = part.mean(dim=dims, keepdim=True)
        return (mean.movedim(2, -1) @ self._constant(self._projectors, k, part)).movedim(-1, 2)

    def _constant(self, tensors, k, like):
        """``tensors[k]`` (a float64 master copy) on ``like``'s device in its dtype, cached: converting the
        projectors from the parameters' dtype would keep a float32 rounding in a float64 model."""
        key = (id(tensors), k, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = tensors[k].to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def _affine(self, parts):
        if self.weight is None:
            return parts
        out = []
        for k, (part, c, U) in enumerate(zip(parts, self._layout.copies, self._bases)):
            tail = (1,) * (part.dim() - 3)
            y = part * self._layout.per_copy(self.weight, k).reshape((1, c, 1) + tail).to(part.dtype)
            if U.shape[1]:
                idx = self._bias_index[k].to(self.bias.device)
                b = self.bias[idx].to(part.dtype) @ self._constant(self._bases, k, part).T
                y = y + b.reshape((1, c, U.shape[0]) + tail)
            out.append(y)
        return out


class FieldBatchNorm(_FieldNorm):
    """Batch normalisation that keeps equivariance (e3nn's ``BatchNorm``, escnn's ``InnerBatchNorm`` /
    ``NormBatchNorm``), per field copy: the batch (and spatial) mean is projected onto the copy's
    invariant subspace before it is removed (a fixed non-invariant shift would break equivariance at
    evaluation), the copy is divided by its RMS over the batch, its channels and space (one scalar
    per copy), and the affine map is a scale per copy and a bias in the invariant subspace. Running
    statistics are kept as in ``nn.BatchNorm``: the running variance is the unbiased one, the sum of
    squares over the copy's ``n`` values (batch, space, channels) divided by ``n - k``, ``k`` the
    dimension of the copy's invariant subspace (the mean removed from it)."""

    def __init__(self, rep: Rep, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True):
        super().__init__(rep, eps, affine)
        self.momentum = momentum
        for k, (c, f) in enumerate(zip(self._layout.copies, self._layout.fields)):
            self.register_buffer(f"running_mean_{k}", torch.zeros(c, f.dim))
            self.register_buffer(f"running_var_{k}", torch.ones(c))

    def forward(self, x):
        _check_x(x, self.rep_in, "FieldBatchNorm")
        parts = self._layout.split(x)
        dims = (0,) + tuple(range(3, x.dim() + 1))  # batch and space
        out = []
        for k, part in enumerate(parts):
            rm, rv = getattr(self, f"running_mean_{k}"), getattr(self, f"running_var_{k}")
            tail = (1,) * (part.dim() - 3)
            if self.training:
                m = self._invariant_mean(k, part, dims)
                v = (part - m).square().mean(dim=dims + (2,), keepdim=True)
                # unbiased for the running variance, as nn.BatchNorm: the mean removed has k_f
                # (the invariant dimension) degrees of freedom out of n values per copy
                n, k_f = part.numel() // part.shape[1], self._bases[k].shape[1]
                if n <= k_f:
                    raise ValueError(f"FieldBatchNorm in training mode needs more than one value per channel to "
                                     f"estimate a variance, got input shape {tuple(x.shape)}: use a batch of at "
                                     "least 2 samples, or eval mode")
                with torch.no_grad():
                    rm.lerp_(m.reshape(rm.shape).to(rm.dtype), self.momentum)
                    rv.lerp_((v * (n / (n - k_f))).reshape(rv.shape).to(rv.dtype), self.momentum)
            else:
                m = rm.to(part.dtype).reshape((1,) + tuple(rm.shape) + tail)
                v = rv.to(part.dtype).reshape((1, rv.shape[0], 1) + tail)
            out.append((part - m) / (v + self.eps).sqrt())
        return self._layout.merge(self._affine(out))


class FieldLayerNorm(_FieldNorm):
    """Layer normalisation that keeps equivariance: per sample, the invariant part of each field copy
    loses its mean over the positions (for ``[B, C, *spatial]`` inputs), and the sample is divided by
    its RMS over all channels and positions (an invariant: the sum of the copies' squared norms), as
    ``nn.LayerNorm`` over the channels; then a scale per copy and a bias in the invariant subspaces.
    Nothing is kept between calls."""

    def __init__(self, rep: Rep, eps: float = 1e-5, affine: bool = True):
        super().__init__(rep, eps, affine)

    def forward(self, x):
        _check_x(x, self.rep_in, "FieldLayerNorm")
        parts = self._layout.split(x)
        space = tuple(range(3, x.dim() + 1))
        if space:
            parts = [p - self._invariant_mean(k, p, space) for k, p in enumerate(parts)]
        sq = sum(p.square().sum(dim=(1, 2) + space) for p in parts)  # [B]
        count = self.rep_in.dim * (x[0, 0].numel() if x.dim() > 2 else 1)
        scale = (sq / count + self.eps).rsqrt().reshape((-1,) + (1,) * x.dim())
        return self._layout.merge(self._affine([p * scale for p in parts]))


class GroupPooling(nn.Module):
    """Invariants of permutation fields (escnn's ``GroupPooling``): the max (or mean) over each copy's
    channels. The output carries one trivial field per input field copy."""

    def __init__(self, rep: Rep, reduction: str = "max"):
        super().__init__()
        rep = as_rep(rep, "rep")
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}")
        bad = [f.name for f in FieldLayout(rep).fields if not is_permutation_field(f, rep.group)]
        if bad:
            raise ValueError(f"group pooling takes fields the group permutes (regular, quotient, trivial); {rep!r} "
                             f"has the fields {bad}: use equiproj.nn.NormPooling for them")
        self.rep_in, self.reduction = rep, reduction
        self._layout = FieldLayout(rep)
        self.rep_out = sum(self._layout.copies) * rep.group.trivial()

    def forward(self, x):
        _check_x(x, self.rep_in, "GroupPooling")
        red = (lambda p: p.amax(2, keepdim=True)) if self.reduction == "max" else (lambda p: p.mean(2, keepdim=True))
        return _merge_pooled(self._layout, [red(p) for p in self._layout.split(x)])


class NormPooling(nn.Module):
    """Invariants of any fields (escnn's ``NormPool``): the norm of each field copy; the output carries
    one trivial field per input field copy."""

    def __init__(self, rep: Rep, eps: float = 0.0):
        super().__init__()
        rep = as_rep(rep, "rep")
        self.rep_in, self.eps = rep, eps
        self._layout = FieldLayout(rep)
        self.rep_out = sum(self._layout.copies) * rep.group.trivial()

    def forward(self, x):
        _check_x(x, self.rep_in, "NormPooling")
        return _merge_pooled(self._layout, [_copies_norm(p, self.eps) for p in self._layout.split(x)])


def _merge_pooled(layout: FieldLayout, parts) -> torch.Tensor:
    """One channel per field copy, in the user's order of the copies (:attr:`FieldLayout.rank`)."""
    return layout.merge(parts, [rank[:, None] for rank in layout.rank])


def centred_grid(n: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> bool:
    """Whether a window of ``kernel_size`` (dilation ``dilation``), stride ``stride`` and padding ``padding``
    along an axis of length ``n`` has its centres symmetric about the axis's centre:
    ``(n + 2 padding - K) % stride == 0`` with ``K = dilation (kernel_size - 1) + 1``. Only then does the
    strided operation commute with the grid's rotations and reflections about the centre."""
    K = dilation * (kernel_size - 1) + 1
    return n + 2 * padding >= K and (n + 2 * padding - K) % stride == 0


class GridPool(nn.Module):
    """Spatial average (any rep) or max (permutation fields) pooling that keeps the grid symmetry.

    ``nn.AvgPool{1,2,3}d`` / ``MaxPool`` with the same ``kernel_size``, ``stride`` (default: the kernel
    size) and ``padding`` on every axis; the input size is checked at each call
    (:func:`centred_grid`): a size whose windows are not centred raises, saying which sizes work.
    ``padding`` counts as zeros for ``"avg"`` (``count_include_pad``) so that windows at the border
    are treated alike.
    """

    def __init__(self, rep: Rep, spatial_dims: int, kernel_size: int, stride: int | None = None, padding: int = 0,
                 mode: str = "avg"):
        super().__init__()
        rep = as_rep(rep, "rep")
        if mode not in ("avg", "max"):
            raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if mode == "max":
            bad = [f.name for f in FieldLayout(rep).fields if not is_permutation_field(f, rep.group)]
            if bad:
                raise ValueError(f"max pooling is equivariant only for fields the group permutes; {rep!r} has the "
                                 f"fields {bad}: use mode='avg'")
        self.rep_in = self.rep_out = rep
        self.spatial_dims, self.kernel_size = spatial_dims, int(kernel_size)
        self.stride, self.padding, self.mode = int(stride or kernel_size), int(padding), mode

    def forward(self, x):
        _check_x(x, self.rep_in, "GridPool")
        if x.dim() != 2 + self.spatial_dims:
            raise ValueError(f"GridPool({self.spatial_dims}-D) takes [B, C, *{self.spatial_dims} spatial] tensors, got "
                             f"shape {tuple(x.shape)}")
        for n in x.shape[2:]:
            if not centred_grid(n, self.kernel_size, self.stride, self.padding):
                good = self.kernel_size - 2 * self.padding
                raise ValueError(f"pooling windows of size {self.kernel_size}, stride {self.stride}, padding "
                                 f"{self.padding} are not centred on an axis of length {n}, so the pooling does not "
                                 f"commute with the grid's symmetries: use lengths n with (n - {good}) % {self.stride} "
                                 "== 0")
        k, s, p = self.kernel_size, self.stride, self.padding
        if self.mode == "avg":
            fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self.spatial_dims - 1]
            return fn(x, k, s, p, count_include_pad=True)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.spatial_dims - 1]
        return fn(x, k, s, p)
