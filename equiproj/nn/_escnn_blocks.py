"""Blocks that compute exactly what an escnn module computes where equiproj's own block of the same kind
normalises or gates differently (docs/interop.md, "Moving an escnn model"). ``from_escnn`` builds them;
they need no escnn. Each knows its ``rep_in`` and ``rep_out`` (read by ``check_equivariance``) and
works on ``[B, C, *spatial]`` tensors; the channel index tensors are escnn's own (per field size or
field type, in escnn's order), so that parameters map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import Rep

__all__ = ["FieldBranches", "GatedFields", "GatedFieldPair", "InnerBatchNorm", "NormBatchNorm", "IIDBatchNorm", "IrrepBatchNorm",
           "AntialiasedAvgPool2d", "FieldDropout", "FieldTensorSquare"]


def _view_fields(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, n, size, *spatial]``: the channels ``index`` of ``x`` as ``n`` fields of ``size`` channels."""
    return x.index_select(1, index).reshape((x.shape[0], -1, size) + x.shape[2:])


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` ``[n]`` / ``[n, k]`` shaped to broadcast over ``x`` ``[B, n, k, *spatial]``."""
    t = t.reshape(t.shape[0], -1)
    return t.reshape((1,) + tuple(t.shape) + (1,) * (x.dim() - 3)).to(x.dtype)


class GatedFields(nn.Module):
    """escnn's ``GatedNonLinearity1``: each gated field is multiplied by ``sigmoid(gate - bias)`` of its gate
    scalar. Gates are taken in their order, and matched to the gated fields grouped by field size
    (smallest first), in field order within a size; the output keeps the gated fields in place (and
    the gates, as ``sigmoid(gate - bias)``, unless ``drop_gates``)."""

    def __init__(self, rep_in: Rep, rep_out: Rep, gate_index: torch.Tensor, groups, bias: torch.Tensor,
                 out_gate_index: torch.Tensor | None):
        super().__init__()
        self.rep_in, self.rep_out = rep_in, rep_out
        self.register_buffer("gate_index", gate_index.long())
        self.register_buffer("out_gate_index", None if out_gate_index is None else out_gate_index.long())
        self.sizes = [int(s) for s, _, _ in groups]
        for k, (_, i_in, i_out) in enumerate(groups):
            self.register_buffer(f"in_index_{k}", i_in.long())
            self.register_buffer(f"out_index_{k}", i_out.long())
        self.bias = nn.Parameter(bias.detach().clone().reshape(-1))

    def forward(self, x):
        gates = torch.sigmoid(x.index_select(1, self.gate_index) - self.bias.reshape((1, -1) + (1,) * (x.dim() - 2)))
        out = x.new_empty((x.shape[0], self.rep_out.dim) + x.shape[2:])
        if self.out_gate_index is not None:
            out[:, self.out_gate_index] = gates
        g0 = 0
        for k, s in enumerate(self.sizes):
            fields = _view_fields(x, getattr(self, f"in_index_{k}"), s)
            n = fields.shape[1]
            out[:, getattr(self, f"out_index_{k}")] = (fields * gates[:, g0:g0 + n, None]).flatten(1, 2)
            g0 += n
        return out


class GatedFieldPair(nn.Module):
    """escnn's ``GatedNonLinearity2``: called with two tensors, the gates (scalar fields) and the gated fields;
    each gated field is multiplied by ``sigmoid(gate - bias)`` of its gate, gates matched to the gated
    fields grouped by field size (smallest first), in field order within a size. The output is the gated
    fields only. ``rep_in`` is the pair's direct sum (gates first), ``rep_gates`` and ``rep_out`` its parts."""

    def __init__(self, rep_gates: Rep, rep_gated: Rep, groups, bias: torch.Tensor):
        super().__init__()
        self.rep_gates, self.rep_out = rep_gates, rep_gated
        self.rep_in = rep_gates + rep_gated
        self.sizes = [int(s) for s, _ in groups]
        for k, (_, idx) in enumerate(groups):
            self.register_buffer(f"index_{k}", idx.long())
        self.bias = nn.Parameter(bias.detach().clone().reshape(-1))

    def forward(self, gates, x):
        if gates.shape[0] != x.shape[0] or gates.shape[2:] != x.shape[2:]:
            raise ValueError(f"GatedFieldPair: gates {tuple(gates.shape)} and fields {tuple(x.shape)} differ in batch or "
                             "spatial shape")
        gates = torch.sigmoid(gates - self.bias.reshape((1, -1) + (1,) * (x.dim() - 2)).to(gates.dtype))
        out = torch.empty_like(x)
        g0 = 0
        for k, s in enumerate(self.sizes):
            idx = getattr(self, f"index_{k}")
            fields = _view_fields(x, idx, s)
            n = fields.shape[1]
            out[:, idx] = (fields * gates[:, g0:g0 + n, None]).flatten(1, 2)
            g0 += n
        return out


class IrrepBatchNorm(nn.Module):
    """escnn's ``GNormBatchNorm``: each field, in the basis where its rep is a direct sum of irreps (escnn's
    change of basis), is normalised irrep by irrep: the invariant (trivial-irrep) components centred
    by their mean, every irrep's block divided by the root of its channels' mean second moment
    (Bessel-corrected over batch and space), times a weight per irrep block, plus a bias on the
    invariant components. As in escnn, training uses the batch statistics and updates the running
    ones. Fields grouped by field type in escnn's order; the buffers are escnn's."""

    def __init__(self, rep: Rep, groups, eps: float, momentum: float, affine: bool):
        super().__init__()
        self.rep_in = self.rep_out = rep
        self.eps, self.momentum, self.affine = float(eps), float(momentum), affine
        self.sizes, self.has_basis = [], []
        for k, g in enumerate(groups):
            s, idx = int(g["size"]), g["index"]
            n = idx.numel() // s
            self.sizes.append(s)
            self.has_basis.append(g["change_of_basis"] is not None)
            self.register_buffer(f"index_{k}", idx.long())
            self.register_buffer(f"trivial_{k}", g["trivial"].long())
            self.register_buffer(f"aggregator_{k}", g["aggregator"].float())
            self.register_buffer(f"propagator_{k}", g["propagator"].float())
            if g["change_of_basis"] is not None:
                self.register_buffer(f"change_of_basis_{k}", g["change_of_basis"].float())
                self.register_buffer(f"change_of_basis_inv_{k}", g["change_of_basis_inv"].float())
            nirr, ntriv = g["aggregator"].shape[1], g["trivial"].numel()
            self.register_buffer(f"running_var_{k}", torch.ones(n, nirr))
            self.register_buffer(f"running_mean_{k}", torch.zeros(n, ntriv))
            if affine:
                self.register_parameter(f"weight_{k}", nn.Parameter(torch.ones(n, nirr)))
                self.register_parameter(f"bias_{k}", nn.Parameter(torch.zeros(n, ntriv)))

    def forward(self, x):
        out = torch.empty_like(x)
        for k, s in enumerate(self.sizes):
            idx, triv = getattr(self, f"index_{k}"), getattr(self, f"trivial_{k}")
            fields = _view_fields(x, idx, s)
            if self.has_basis[k]:
                fields = torch.einsum("ds,bcs...->bcd...", getattr(self, f"change_of_basis_inv_{k}").to(x.dtype), fields)
            rv, rm = getattr(self, f"running_var_{k}"), getattr(self, f"running_mean_{k}")
            if self.training:
                flat = fields.detach().reshape(fields.shape[0], fields.shape[1], s, -1)
                m = flat.shape[0] * flat.shape[3]
                mean = flat[:, :, triv].mean(dim=(0, 3))
                second = flat.square().mean(dim=(0, 3))
                second[:, triv] -= mean.square()
                var = torch.einsum("io,ci->co", getattr(self, f"aggregator_{k}").to(x.dtype), second)
                var = var * (m / (m - 1) if m > 1 else 1.0)
                with torch.no_grad():
                    rv.mul_(1 - self.momentum).add_(self.momentum * var.to(rv.dtype))
                    rm.mul_(1 - self.momentum).add_(self.momentum * mean.to(rm.dtype))
            else:
                var, mean = rv, rm
            weight = getattr(self, f"weight_{k}") if self.affine else 1.0
            scale = torch.einsum("oi,ci->co", getattr(self, f"propagator_{k}").to(x.dtype), weight / (var + self.eps).sqrt())
            shift = torch.zeros((fields.shape[1], s), dtype=x.dtype, device=x.device)
            shift[:, triv] = -mean.to(x.dtype) * scale[:, triv]
            if self.affine:
                shift[:, triv] += getattr(self, f"bias_{k}").to(x.dtype)
            fields = fields * _bcast(scale, fields) + _bcast(shift, fields)
            if self.has_basis[k]:
                fields = torch.einsum("ds,bcs...->bcd...", getattr(self, f"change_of_basis_{k}").to(x.dtype), fields)
            out[:, idx] = fields.flatten(1, 2)
        return out


class InnerBatchNorm(nn.Module):
    """escnn's ``InnerBatchNorm`` (permutation fields): ``nn.BatchNorm`` with one mean, variance, weight and
    bias per field copy, shared by the copy's channels; the running variance is Bessel-corrected as in
    ``nn.BatchNorm`` (equiproj's :class:`FieldBatchNorm` keeps the uncorrected one). Fields grouped by
    size in escnn's order."""

    def __init__(self, rep: Rep, groups, eps: float, momentum: float, affine: bool):
        super().__init__()
        self.rep_in = self.rep_out = rep
        self.eps, self.momentum, self.affine = float(eps), float(momentum), affine
        self.sizes = [int(s) for s, _ in groups]
        for k, (s, idx) in enumerate(groups):
            n = idx.numel() // int(s)
            self.register_buffer(f"index_{k}", idx.long())
            self.register_buffer(f"running_mean_{k}", torch.zeros(n))
            self.register_buffer(f"running_var_{k}", torch.ones(n))
            if affine:
                self.register_parameter(f"weight_{k}", nn.Parameter(torch.ones(n)))
                self.register_parameter(f"bias_{k}", nn.Parameter(torch.zeros(n)))

    def forward(self, x):
        out = torch.empty_like(x)
        for k, s in enumerate(self.sizes):
            idx = getattr(self, f"index_{k}")
            fields = _view_fields(x, idx, s)
            y = F.batch_norm(fields.reshape(fields.shape[0], fields.shape[1], -1), getattr(self, f"running_mean_{k}"),
                             getattr(self, f"running_var_{k}"), getattr(self, f"weight_{k}", None),
                             getattr(self, f"bias_{k}", None), self.training, self.momentum, self.eps)
            out[:, idx] = y.reshape(fields.shape).flatten(1, 2)
        return out


class NormBatchNorm(nn.Module):
    """escnn's ``NormBatchNorm``: each field (no invariant part) is divided by the RMS of its norm; the
    variance per field is ``E|x_f|^2 / size`` (Bessel-corrected over batch and space) and, as in escnn,
    the running variance is updated first and used for the output in training too. Fields are grouped
    by size (escnn's order); a weight per field."""

    def __init__(self, rep: Rep, groups, eps: float, momentum: float, affine: bool):
        super().__init__()
        self.rep_in = self.rep_out = rep
        self.eps, self.momentum = float(eps), float(momentum)
        self.sizes = [int(s) for s, _ in groups]
        for k, (s, idx) in enumerate(groups):
            n = idx.numel() // int(s)
            self.register_buffer(f"index_{k}", idx.long())
            self.register_buffer(f"running_var_{k}", torch.ones(n))
            if affine:
                self.register_parameter(f"weight_{k}", nn.Parameter(torch.ones(n)))
        self.affine = affine

    def forward(self, x):
        out = x.clone()
        for k, s in enumerate(self.sizes):
            idx, rv = getattr(self, f"index_{k}"), getattr(self, f"running_var_{k}")
            fields = _view_fields(x, idx, s)
            if self.training:
                sq = fields.detach().square().sum(2).transpose(0, 1).reshape(fields.shape[1], -1)
                m = sq.shape[1]
                var = sq.mean(1) / s * (m / (m - 1) if m > 1 else 1.0)
                with torch.no_grad():
                    rv.mul_(1 - self.momentum).add_(self.momentum * var.to(rv.dtype))
            scale = (getattr(self, f"weight_{k}") if self.affine else 1.0) / (rv + self.eps).sqrt()
            out[:, idx] = (fields * _bcast(scale, fields)).flatten(1, 2)
        return out


class IIDBatchNorm(nn.Module):
    """escnn's ``IIDBatchNorm1d/2d/3d``: per field type, the mean projected onto the invariant subspace is
    removed, and the field divided by the square root of its channels' mean variance (Bessel-corrected
    over batch and space); a weight per field and a bias in the invariant subspace (escnn's basis
    ``Q`` of it)."""

    def __init__(self, rep: Rep, groups, eps: float, momentum: float, affine: bool):
        super().__init__()
        self.rep_in = self.rep_out = rep
        self.eps, self.momentum, self.affine = float(eps), float(momentum), affine
        self.sizes, self.has_invariant = [], []
        for k, (s, idx, avg, Q) in enumerate(groups):
            n = idx.numel() // int(s)
            self.sizes.append(int(s))
            self.has_invariant.append(avg is not None)
            self.register_buffer(f"index_{k}", idx.long())
            self.register_buffer(f"running_var_{k}", torch.ones(n, 1))
            if avg is not None:
                self.register_buffer(f"avg_{k}", avg.float())
                self.register_buffer(f"basis_{k}", Q.float())
                self.register_buffer(f"running_mean_{k}", torch.zeros(n, int(s)))
            if affine:
                self.register_parameter(f"weight_{k}", nn.Parameter(torch.ones(n, 1)))
                if avg is not None:
                    self.register_parameter(f"bias_{k}", nn.Parameter(torch.zeros(n, Q.shape[1])))

    def forward(self, x):
        out = torch.empty_like(x)
        for k, s in enumerate(self.sizes):
            idx = getattr(self, f"index_{k}")
            fields = _view_fields(x, idx, s)
            axes = (0,) + tuple(range(3, fields.dim()))
            rv = getattr(self, f"running_var_{k}")
            if self.training:
                if self.has_invariant[k]:
                    mean = torch.einsum("ij,bcj...->bci...", getattr(self, f"avg_{k}").to(x.dtype),
                                        fields.mean(dim=axes, keepdim=True).detach())
                    centred = fields - mean
                    mean = mean.reshape(mean.shape[1], mean.shape[2])
                else:
                    centred = fields
                var = centred.var(dim=axes, unbiased=True).mean(dim=1, keepdim=True).detach()
                with torch.no_grad():
                    rv.mul_(1 - self.momentum).add_(self.momentum * var.to(rv.dtype))
                    if self.has_invariant[k]:
                        rm = getattr(self, f"running_mean_{k}")
                        rm.mul_(1 - self.momentum).add_(self.momentum * mean.to(rm.dtype))
            else:
                var = rv
                mean = getattr(self, f"running_mean_{k}") if self.has_invariant[k] else None
            if self.has_invariant[k]:
                fields = fields - _bcast(mean, fields)
            weight = getattr(self, f"weight_{k}") if self.affine else 1.0
            fields = fields * _bcast(weight / (var + self.eps).sqrt(), fields)
            if self.affine and self.has_invariant[k]:
                b = torch.einsum("ij,cj->ci", getattr(self, f"basis_{k}").to(x.dtype), getattr(self, f"bias_{k}"))
                fields = fields + _bcast(b, fields)
            out[:, idx] = fields.flatten(1, 2)
        return out


class AntialiasedAvgPool2d(nn.Module):
    """escnn's ``PointwiseAvgPoolAntialiased2D``: every channel blurred by the same normalised Gaussian
    filter (isotropic, so it commutes with the grid's rotations and reflections) with a stride."""

    def __init__(self, rep: Rep, filter: torch.Tensor, stride, padding):
        super().__init__()
        self.rep_in = self.rep_out = rep
        self.register_buffer("filter", filter.detach().clone())
        self.stride, self.padding = tuple(stride), tuple(padding)

    def forward(self, x):
        return F.conv2d(x, self.filter.to(x.dtype), stride=self.stride, padding=self.padding, groups=x.shape[1])


class FieldDropout(nn.Module):
    """escnn's ``FieldDropout``: in training each field copy is kept with probability ``1 - p`` (scaled by
    ``1 / (1 - p)``) or zeroed as a whole, so the operation commutes with the group; fields grouped by
    size in escnn's order, the masks drawn in that order (the same draws as escnn's under one seed)."""

    def __init__(self, rep: Rep, groups, p: float):
        super().__init__()
        self.rep_in = self.rep_out = rep
        self.p = float(p)
        self.sizes = [int(s) for s, _ in groups]
        for k, (_, idx) in enumerate(groups):
            self.register_buffer(f"index_{k}", idx.long())

    def forward(self, x):
        if not self.training:
            return x
        out = torch.empty_like(x)
        for k, s in enumerate(self.sizes):
            idx = getattr(self, f"index_{k}")
            fields = _view_fields(x, idx, s)
            shape = list(fields.shape)
            shape[2] = 1
            mask = (torch.empty(shape, device=x.device).uniform_() > self.p).to(torch.float)
            out[:, idx] = (fields * mask / (1.0 - self.p)).flatten(1, 2)
        return out


class FieldBranches(nn.Module):
    """escnn's ``MultipleModule``: the input's fields split by label (``index[i]``: the channels of branch
    ``i``'s fields, in field order), each branch's module applied to its part, and the outputs
    concatenated in branch order."""

    def __init__(self, rep_in: Rep, rep_out: Rep, index, branches):
        super().__init__()
        self.rep_in, self.rep_out = rep_in, rep_out
        for k, idx in enumerate(index):
            self.register_buffer(f"index_{k}", idx.long())
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x.index_select(1, getattr(self, f"index_{k}"))) for k, b in enumerate(self.branches)], 1)


class FieldTensorSquare(nn.Module):
    """escnn's ``TensorProductModule``: each of the ``C`` input fields (all of one type, size ``s``) times
    itself, ``x_f (x) x_f`` (``s^2`` channels), mapped by its own ``[o, s^2]`` block of ``weight``
    ``[C * o, s^2]`` (escnn's expanded ``matrix``) to the output field ``f`` of size ``o``. The weight is a
    plain parameter: it is not declared (the penalty, ``report`` and ``project_`` do not see it)."""

    def __init__(self, rep_in: Rep, rep_out: Rep, fields: int, weight: torch.Tensor):
        super().__init__()
        self.rep_in, self.rep_out = rep_in, rep_out
        self.fields = int(fields)
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None

    def forward(self, x):
        C, s = self.fields, x.shape[1] // self.fields
        fields = x.reshape((x.shape[0], C, s) + x.shape[2:])
        square = torch.einsum("bci...,bco...->bcio...", fields, fields).reshape((x.shape[0], C, s * s) + x.shape[2:])
        out = torch.einsum("coi,bci...->bco...", self.weight.reshape(C, -1, s * s).to(x.dtype), square)
        return out.reshape((x.shape[0], -1) + x.shape[2:])
