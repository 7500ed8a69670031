"""escnn models as plain, declared PyTorch models and back (optional: escnn is used, never imported, by
``from_escnn``; ``to_escnn`` writes into escnn modules it is given; docs/interop.md).

``from_escnn`` converts module by module, by escnn class name (the table ``_CONVERTERS``): convolutions
and linear maps become declared plain layers, nonlinearities, poolings, normalisations and dropouts
the equiproj block that computes the same (or, where equiproj's block normalises or gates
differently, the block of :mod:`._escnn_blocks` that computes exactly what escnn does), containers
the matching torch container. Modules without a counterpart are refused by name (``_REFUSED``).
Every converted module remembers the path and class of its escnn module (``escnn_path``,
``escnn_class``: plain attributes, kept by pickling and ``deepcopy``), so that ``to_escnn`` can write
the parameters back.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import Rep, as_rep
from ..kernel_spaces import escnn_conv_to_torch
from ..kernel_spaces import escnn_conv_declaration
from ._blocks import GridPool, GroupPooling, NormActivation, NormPooling, PointwiseActivation
from ._declare import declaration, declare
from ._escnn_blocks import (AntialiasedAvgPool2d, FieldBranches, FieldDropout, GatedFieldPair, GatedFields, IIDBatchNorm,
                            FieldTensorSquare, InnerBatchNorm, IrrepBatchNorm, NormBatchNorm)

__all__ = ["from_escnn", "to_escnn", "ESCNN_MODULES"]

#: the escnn module each converted model came from (in this process), the default target of to_escnn
_SOURCES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _squash(t):
    return t / (1.0 + t)




def _rep(field_type) -> Rep:
    return as_rep(field_type, "field type")


def _full_index(m, name: str, key) -> torch.Tensor:
    """escnn's channel indices of one field group: stored as ``[start, stop]`` when contiguous."""
    idx = getattr(m, name)
    idx = torch.as_tensor(idx, dtype=torch.long)
    return torch.arange(int(idx[0]), int(idx[1])) if m._contiguous[key] else idx.clone()


# ---- converters: escnn module -> plain module ------------------------------------------------------
def _conv(m, bias: bool):
    space, rep_in, rep_out = escnn_conv_declaration(m)
    return declare(escnn_conv_to_torch(m), rep_in, rep_out, kernel_space=space, bias=bias)


def _conv_transposed(m, bias: bool):
    with torch.no_grad():
        filt, b = m.expand_parameters()
    cls = nn.ConvTranspose2d if filt.dim() == 4 else nn.ConvTranspose3d
    out = cls(m.in_type.size, m.out_type.size, m.kernel_size, stride=m.stride, padding=m.padding,
              output_padding=m.output_padding, groups=m.groups, bias=b is not None, dilation=m.dilation,
              device=filt.device, dtype=filt.dtype)
    with torch.no_grad():
        out.weight.copy_(filt)
        if b is not None:
            out.bias.copy_(b)
    # declare takes no transposed convolution: the layer is converted but the penalty does not see it
    out.rep_in, out.rep_out = _rep(m.in_type), _rep(m.out_type)
    return out


def _linear(m, bias: bool):
    with torch.no_grad():
        W, b = m.expand_parameters()
    out = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        out.weight.copy_(W)
        if b is not None:
            out.bias.copy_(b)
    return declare(out, _rep(m.in_type), _rep(m.out_type), bias=bias)


def _pointwise(act):
    return lambda m, bias: PointwiseActivation(_rep(m.in_type), act)


def _elu(m, bias: bool):
    return PointwiseActivation(_rep(m.in_type), functools.partial(F.elu, alpha=float(m.alpha)))


def _torch_function(fn, what: str):
    """escnn's activation when it is one of torch's functions (escnn picks them by name: ``p_relu``, ...)."""
    if not str(getattr(fn, "__module__", "")).startswith("torch"):
        raise NotImplementedError(f"escnn's {what} with the function {fn!r}, which is not one of torch's: convert the "
                                  "modules around it and write this one by hand")
    return fn


def _pointwise_nonlinearity(m, bias: bool):
    return PointwiseActivation(_rep(m.in_type), _torch_function(m._function, "PointwiseNonLinearity"))


def _norm_nonlinearity(m, bias: bool):
    # escnn's squash is a lambda (t / (1 + t)); its other norm functions are torch's
    act = _squash if getattr(m._function, "__name__", "") == "<lambda>" else _torch_function(m._function, "NormNonLinearity")
    out = NormActivation(_rep(m.in_type), act=act, bias=m.log_bias is not None, normalize=True, eps=float(m.eps))
    if m.log_bias is not None:
        with torch.no_grad():
            out.bias.copy_(_norm_bias_to_fields(m))
    return out


def _norm_bias_order(field_type) -> list[int]:
    """Field positions in the order of escnn's ``log_bias`` entries: by field size (smallest first), then
    field order."""
    sizes = [r.size for r in field_type.representations]
    return sorted(range(len(sizes)), key=lambda i: (sizes[i], i))


def _norm_bias_to_fields(m) -> torch.Tensor:
    b = -torch.exp(m.log_bias.detach().reshape(-1))
    out = torch.empty_like(b)
    out[torch.tensor(_norm_bias_order(m.in_type))] = b
    return out


def _gated1(m, bias: bool):
    gate_index = _full_index(m, "gates_indices", "gate")
    groups = [(s, _full_index(m, f"input_indices_{s}", s), _full_index(m, f"output_indices_{s}", s)) for s in m._order]
    out_gates = None if m.drop_gates else _full_index(m, "output_indices_gate", "gate")
    return GatedFields(_rep(m.in_type), _rep(m.out_type), gate_index, groups, m.bias.detach(), out_gates)


def _gated2(m, bias: bool):
    gates_type, gated_type = m.in_type
    groups = [(s, _full_index(m, f"indices_{s}", s)) for s in m._order]
    return GatedFieldPair(_rep(gates_type), _rep(gated_type), groups, m.bias.detach())


def _tensor_product(m, bias: bool):
    with torch.no_grad():
        weight = m.expand_parameters()
    return FieldTensorSquare(_rep(m.in_type), _rep(m.out_type), len(m.in_type), weight)


def _check_stats(m):
    if not getattr(m, "track_running_stats", True) or m.momentum is None:
        raise NotImplementedError(f"escnn's {type(m).__name__} without running statistics (or momentum=None) is not "
                                  "converted: build it with track_running_stats=True and a momentum")


def _inner_batchnorm(m, bias: bool):
    _check_stats(m)
    groups = [(s, _full_index(m, f"indices_{s}", s)) for s in m._contiguous]
    out = InnerBatchNorm(_rep(m.in_type), groups, m.eps, m.momentum, m.affine)
    _copy_inner_batchnorm(m, out, to_escnn=False)
    return out


def _copy_inner_batchnorm(m, out, to_escnn: bool):
    """escnn keeps one ``nn.BatchNorm`` per field size (``batch_norm_[s]``): its buffers and parameters."""
    with torch.no_grad():
        for k, s in enumerate(m._contiguous):
            bn = getattr(m, f"batch_norm_[{s}]")
            for name in ("running_mean", "running_var", "weight", "bias"):
                e, q = getattr(bn, name, None), getattr(out, f"{name}_{k}", None)
                if e is not None and q is not None:
                    (e.copy_(q) if to_escnn else q.copy_(e))


def _norm_batchnorm(m, bias: bool):
    _check_stats(m)
    groups = [(s, _full_index(m, f"{s}_indices", s)) for s in m._order]
    out = NormBatchNorm(_rep(m.in_type), groups, m.eps, m.momentum, m.affine)
    _copy_norm_batchnorm(m, out, to_escnn=False)
    return out


def _copy_norm_batchnorm(m, out, to_escnn: bool):
    with torch.no_grad():
        for k, s in enumerate(m._order):
            pairs = [(getattr(m, f"{s}_running_var"), getattr(out, f"running_var_{k}"))]
            if m.affine:
                pairs.append((getattr(m, f"{s}_weight"), getattr(out, f"weight_{k}")))
            for e, q in pairs:
                (e.view(-1).copy_(q) if to_escnn else q.copy_(e.reshape(-1)))


def _iid_batchnorm(m, bias: bool):
    _check_stats(m)
    groups = []
    for name, size in m._sizes:
        esc = m._escape_name(name)
        idx = _full_index(m, f"{esc}_indices", name)
        has = m._has_trivial[name]
        groups.append((size, idx, getattr(m, f"{esc}_avg") if has else None,
                       getattr(m, f"{esc}_change_of_basis") if has else None))
    out = IIDBatchNorm(_rep(m.in_type), groups, m.eps, m.momentum, m.affine)
    _copy_iid_batchnorm(m, out, to_escnn=False)
    return out


def _copy_iid_batchnorm(m, out, to_escnn: bool):
    with torch.no_grad():
        for k, (name, _) in enumerate(m._sizes):
            esc = m._escape_name(name)
            for e_name, q_name in (("running_var", "running_var"), ("running_mean", "running_mean"), ("weight", "weight"),
                                   ("bias", "bias")):
                e, q = getattr(m, f"{esc}_{e_name}", None), getattr(out, f"{q_name}_{k}", None)
                if e is not None and q is not None:
                    (e.copy_(q) if to_escnn else q.copy_(e))


def _gnorm_batchnorm(m, bias: bool):
    _check_stats(m)
    groups = []
    for name, size in m._sizes:
        esc = m._escape_name(name)
        groups.append({"size": size, "index": _full_index(m, f"{esc}_indices", name), "trivial": m._trivial_idxs[name],
                       "aggregator": getattr(m, f"vars_aggregator_{esc}"), "propagator": getattr(m, f"vars_propagator_{esc}"),
                       "change_of_basis": getattr(m, f"{esc}_change_of_basis", None),
                       "change_of_basis_inv": getattr(m, f"{esc}_change_of_basis_inv", None)})
    out = IrrepBatchNorm(_rep(m.in_type), groups, m.eps, m.momentum, m.affine)
    _copy_gnorm_batchnorm(m, out, to_escnn=False)
    return out


def _copy_gnorm_batchnorm(m, out, to_escnn: bool):
    with torch.no_grad():
        for k, (name, _) in enumerate(m._sizes):
            esc = m._escape_name(name)
            for field in ("running_var", "running_mean", "weight", "bias"):
                e, q = getattr(m, f"{esc}_{field}", None), getattr(out, f"{field}_{k}", None)
                if e is not None and q is not None:
                    (e.copy_(q) if to_escnn else q.copy_(e))


def _group_pooling(m, bias: bool):
    return GroupPooling(_rep(m.in_type), "max")


def _norm_pool(m, bias: bool):
    return NormPooling(_rep(m.in_type))


def _grid_pool(mode: str, dims: int):
    def convert(m, bias: bool):
        k, s, p = (tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
                   for v in (m.kernel_size, m.stride, m.padding))
        dil = getattr(m, "dilation", 1)
        dil = tuple(dil) if isinstance(dil, (tuple, list)) else (dil,) * dims
        if len({*k}) != 1 or len({*s}) != 1 or len({*p}) != 1 or set(dil) != {1} or getattr(m, "ceil_mode", False):
            raise NotImplementedError(f"escnn's {type(m).__name__} with kernel {k}, stride {s}, padding {p}, dilation "
                                      f"{dil}, ceil_mode={getattr(m, 'ceil_mode', False)}: equiproj's GridPool takes the "
                                      "same size, stride and padding on every axis, no dilation or ceil_mode (other "
                                      "windows are not centred under the grid's symmetries)")
        return GridPool(_rep(m.in_type), dims, k[0], s[0], p[0], mode)
    return convert


def _antialiased_pool(m, bias: bool):
    return AntialiasedAvgPool2d(_rep(m.in_type), m.filter, m.stride, m.padding)


def _pointwise_dropout(m, bias: bool):
    return nn.Dropout(float(m.p))


def _field_dropout(m, bias: bool):
    groups = [(s, _full_index(m, f"indices_{s}", s)) for s in m._order]
    return FieldDropout(_rep(m.in_type), groups, m.p)


def _identity(m, bias: bool):
    return nn.Identity()


def _sequential(m, bias: bool, path: str = ""):
    out = nn.Sequential()
    for name, child in m.named_children():
        out.add_module(name, _convert(child, bias, f"{path}.{name}" if path else name))
    return out


def _multiple(m, bias: bool, path: str = ""):
    if m.branching.reshuffle_layer is not None:
        raise NotImplementedError("escnn's MultipleModule with reshuffle > 0: build it with reshuffle=0 (the default)")
    index, branches = [], []
    for i, labels in enumerate(m.merging._labels):
        labels = [labels] if isinstance(labels, str) else list(labels)
        if len(labels) != 1:
            raise NotImplementedError(f"escnn's MultipleModule: its branch {i} takes {len(labels)} labelled inputs "
                                      f"({labels}); equiproj converts branches of one input")
        child = getattr(m.merging, f"submodule_{i}")
        index.append(_full_index(m.branching, f"indices_{labels[0]}", labels[0]))
        branches.append(_convert(child, bias, f"{path}.merging.submodule_{i}" if path else f"merging.submodule_{i}"))
    return FieldBranches(_rep(m.in_type), _rep(m.out_type), index, branches)


#: escnn class name -> converter; the table docs/interop.md lists
_CONVERTERS = {
    "R2Conv": _conv, "R3Conv": _conv, "R2ConvTransposed": _conv_transposed, "R3ConvTransposed": _conv_transposed,
    "Linear": _linear,
    "ReLU": _pointwise(F.relu), "ELU": _elu, "PointwiseNonLinearity": _pointwise_nonlinearity,
    "NormNonLinearity": _norm_nonlinearity, "GatedNonLinearity1": _gated1, "GatedNonLinearity2": _gated2,
    "InnerBatchNorm": _inner_batchnorm, "NormBatchNorm": _norm_batchnorm, "GNormBatchNorm": _gnorm_batchnorm,
    "IIDBatchNorm1d": _iid_batchnorm, "IIDBatchNorm2d": _iid_batchnorm, "IIDBatchNorm3d": _iid_batchnorm,
    "GroupPooling": _group_pooling, "NormPool": _norm_pool,
    "PointwiseMaxPool2D": _grid_pool("max", 2), "PointwiseMaxPool3D": _grid_pool("max", 3),
    "PointwiseAvgPool2D": _grid_pool("avg", 2), "PointwiseAvgPool3D": _grid_pool("avg", 3),
    "PointwiseAvgPoolAntialiased2D": _antialiased_pool,
    "PointwiseDropout": _pointwise_dropout, "FieldDropout": _field_dropout,
    "TensorProductModule": _tensor_product, "IdentityModule": _identity, "SequentialModule": _sequential, "MultipleModule": _multiple,
}

#: escnn modules refused, and what to do instead
_REFUSED = {
    "BranchingModule": "its output is a dict of tensors; use it inside a MultipleModule, which is converted",
    "MergeModule": "it takes a dict of tensors; use it inside a MultipleModule, which is converted",
    "R3IcoConv": "the icosahedral group has no equiproj counterpart",
    "R3IcoConvTransposed": "the icosahedral group has no equiproj counterpart",
    "FourierPointwise": "its Fourier sampling has no equiproj block; use GatedNonLinearity1 or NormNonLinearity",
    "FourierELU": "its Fourier sampling has no equiproj block; use GatedNonLinearity1 or NormNonLinearity",
    "QuotientFourierPointwise": "its Fourier sampling has no equiproj block",
    "QuotientFourierELU": "its Fourier sampling has no equiproj block",
    "GatedNonLinearityUniform": "use GatedNonLinearity1", "ConcatenatedNonLinearity": "use GatedNonLinearity1",
    "VectorFieldNonLinearity": "use NormNonLinearity", "LeakyReLU": "use ReLU or ELU (or convert by hand: "
                                                                     "equiproj.nn.PointwiseActivation(rep, F.leaky_relu))",
    "InducedNormBatchNorm": "induced representations have no equiproj counterpart",
    "InducedNormNonLinearity": "induced representations have no equiproj counterpart",
    "InducedNormPool": "induced representations have no equiproj counterpart",
    "InducedGatedNonLinearity1": "induced representations have no equiproj counterpart",
    "NormMaxPool": "use NormPool", "MaxPoolChannels": "use GroupPooling",
    "PointwiseMaxPoolAntialiased2D": "use PointwiseAvgPoolAntialiased2D or PointwiseMaxPool2D",
    "PointwiseMaxPoolAntialiased3D": "use PointwiseAvgPool3D", "PointwiseAvgPoolAntialiased3D": "use PointwiseAvgPool3D",
    "PointwiseAdaptiveAvgPool2D": "adaptive windows are not centred for every input size; use PointwiseAvgPool2D",
    "PointwiseAdaptiveAvgPool3D": "adaptive windows are not centred for every input size; use PointwiseAvgPool3D",
    "PointwiseAdaptiveMaxPool2D": "adaptive windows are not centred for every input size; use PointwiseMaxPool2D",
    "PointwiseAdaptiveMaxPool3D": "adaptive windows are not centred for every input size; use PointwiseMaxPool3D",
    "R2Upsampling": "use torch.nn.Upsample after conversion", "R3Upsampling": "use torch.nn.Upsample after conversion",
    "RestrictionModule": "declare the converted layers with the subgroup's reps instead",
    "DisentangleModule": "it changes basis only; convert the layers around it",
    "ReshuffleModule": "it permutes fields only; convert the layers around it",
    "MaskModule": "use a plain mask after conversion",
    "HarmonicPolynomialR3": "it builds features from coordinates; keep it in escnn",
}

#: every escnn module with its status, as docs/interop.md tabulates it
ESCNN_MODULES = {**{k: "converted" for k in _CONVERTERS}, **{k: "refused: " + v for k, v in _REFUSED.items()}}


def _convert(m, bias: bool, path: str) -> nn.Module:
    name = type(m).__name__
    if name in _CONVERTERS:
        container = name in ("SequentialModule", "MultipleModule")  # their children take paths of their own
        out = _CONVERTERS[name](m, bias, path) if container else _CONVERTERS[name](m, bias)
        out.escnn_path, out.escnn_class = path, name  # where to_escnn writes this module's parameters back
        return out
    if name in _REFUSED:
        raise NotImplementedError(f"from_escnn does not convert escnn's {name}: {_REFUSED[name]}")
    raise NotImplementedError(f"from_escnn does not know escnn's {name}: convert the modules around it and write its "
                              f"plain counterpart by hand")


def from_escnn(module, *, bias: bool = True) -> nn.Module:
    """Plain PyTorch modules computing what an escnn module or model computes, every convolution and
    linear map declared.

    Module by module (docs/interop.md has the table): ``R2Conv``/``R3Conv`` become a plain
    ``nn.Conv2d``/``nn.Conv3d`` with the expanded filter and bias, declared with the reps of its field
    types and the kernel space whose equivariant kernels are the span of its basis; ``Linear`` a
    declared ``nn.Linear``; nonlinearities, poolings, batch norms and dropouts the equiproj block
    that computes the same (:class:`NormActivation` with ``b = -exp(log_bias)``, :class:`GroupPooling`,
    :class:`NormPooling`, :class:`GridPool`, ...,
    parameters and running statistics copied); ``SequentialModule`` an ``nn.Sequential`` with the same
    child names. Modules without a counterpart raise ``NotImplementedError`` naming them and what to do.
    The escnn model is left as it is (train/eval mode included); the result has its mode.

    :func:`to_escnn` writes the (trained) parameters back into an escnn model.

    Example::

        >>> import equiproj
        >>> from escnn import gspaces, nn as escnn_nn
        >>> gs = gspaces.rot2dOnR2(8)
        >>> field_type = escnn_nn.FieldType(gs, 2 * [gs.regular_repr])
        >>> escnn_model = escnn_nn.SequentialModule(escnn_nn.R2Conv(field_type, field_type, kernel_size=5),
        ...                                         escnn_nn.ReLU(field_type))
        >>> plain = equiproj.nn.from_escnn(escnn_model)
        >>> penalty = equiproj.nn.ProjectionPenalty(plain, lambda_perp=1e-2)
    """
    if not isinstance(module, nn.Module) or type(module).__module__.split(".")[0] != "escnn":
        raise TypeError(f"from_escnn takes an escnn module (R2Conv, SequentialModule, ...), got {type(module).__name__}")
    out = _convert(module, bias, "")
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        out.to(dtype)  # the blocks' statistics and parameters in the escnn model's dtype
    out.train(module.training)
    _SOURCES[out] = module
    return out


# ---- the way back ---------------------------------------------------------------------------------
def _basis_matrix(expansion, nb: int) -> torch.Tensor:
    """``[numel, nb]`` float64: escnn's (linear) basis expansion evaluated on each coefficient vector."""
    eye = torch.eye(nb)
    try:
        cols = torch.func.vmap(expansion)(eye)
    except Exception:  # noqa: BLE001 - an expansion vmap cannot trace: one call per basis element
        cols = torch.stack([expansion(e) for e in eye])
    return cols.reshape(nb, -1).T.double()


def _lstsq(B: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Coefficients ``c`` minimising ``||B c - target||`` and the relative residual."""
    t = target.detach().double().reshape(-1, 1).cpu()
    c = torch.linalg.lstsq(B, t, driver="gelsd").solution
    res = float((B @ c - t).norm() / t.norm().clamp_min(1e-300))
    return c[:, 0], res


def _write_expansion(src, dst, residuals: dict, path: str) -> None:
    """A plain conv/linear's weight and bias as escnn coefficients of ``dst`` (least squares in its basis)."""
    with torch.no_grad():
        B = _basis_matrix(dst.basisexpansion, int(dst.weights.numel()))
        # escnn's transposed convs expand to [c_out, c_in, ...] and hand torch the transpose
        weight = src.weight.transpose(0, 1) if "Transposed" in type(dst).__name__ else src.weight
        if B.shape[0] != weight.numel():
            raise ValueError(f"to_escnn: {path or 'the layer'} has {weight.numel()} weights but escnn's {type(dst).__name__} "
                             f"expands to {B.shape[0]}: not the same layer shape")
        c, residuals[path or "."] = _lstsq(B, weight)
        dst.weights.copy_(c.to(dst.weights.dtype))
        if getattr(dst, "bias", None) is not None and src.bias is not None:
            cb, residuals[(path or ".") + " bias"] = _lstsq(dst.bias_expansion.double().cpu(), src.bias)
            dst.bias.copy_(cb.to(dst.bias.dtype))
        elif src.bias is not None and bool(src.bias.detach().ne(0).any()):
            residuals[(path or ".") + " bias"] = 1.0  # escnn's layer has no bias here (no invariant output field)


def _write_norm_nonlinearity(src: NormActivation, dst, residuals: dict, path: str) -> None:
    if dst.log_bias is None:
        return
    b = src.bias.detach().reshape(-1)[torch.tensor(_norm_bias_order(dst.in_type))]
    if bool((b >= 0).any()):
        residuals[(path or ".") + " bias"] = float(b.clamp_min(0).norm() / b.norm().clamp_min(1e-300))
    with torch.no_grad():
        dst.log_bias.copy_(torch.log((-b).clamp_min(1e-30)).reshape(dst.log_bias.shape))


#: escnn modules whose weights are coefficients of a basis expansion
_EXPANDED = ("R2Conv", "R3Conv", "Linear", "R2ConvTransposed", "R3ConvTransposed", "TensorProductModule")


def _write_back(src, dst, residuals: dict, path: str) -> None:
    name = type(dst).__name__
    with torch.no_grad():
        if name in _EXPANDED:
            _write_expansion(src, dst, residuals, path)
        elif name == "NormNonLinearity":
            _write_norm_nonlinearity(src, dst, residuals, path)
        elif name in ("GatedNonLinearity1", "GatedNonLinearity2"):
            dst.bias.copy_(src.bias.reshape(dst.bias.shape))
        elif name == "InnerBatchNorm":
            _copy_inner_batchnorm(dst, src, to_escnn=True)
        elif name == "NormBatchNorm":
            _copy_norm_batchnorm(dst, src, to_escnn=True)
        elif name == "GNormBatchNorm":
            _copy_gnorm_batchnorm(dst, src, to_escnn=True)
        elif name.startswith("IIDBatchNorm"):
            _copy_iid_batchnorm(dst, src, to_escnn=True)


def _copy_escnn(module: nn.Module) -> nn.Module:
    """A deep copy of an escnn model whose field types, gspaces, groups and kernel bases are shared with
    the original (escnn's groups cannot be deep-copied; these objects are not changed by training)."""
    memo: dict[int, object] = {}
    seen: set[int] = set()

    def share(x, depth=0):
        if id(x) in seen or depth > 16 or isinstance(x, (torch.Tensor, str, bytes, int, float)):
            return
        seen.add(id(x))
        if type(x).__module__.split(".")[0] == "escnn" and not isinstance(x, nn.Module):
            memo[id(x)] = x
        elif isinstance(x, (list, tuple, set, frozenset)):
            for y in x:
                share(y, depth + 1)
        elif isinstance(x, dict):
            for k, y in x.items():
                share(k, depth + 1)
                share(y, depth + 1)
        elif hasattr(x, "__dict__"):
            share(vars(x), depth + 1)

    share(module)
    return copy.deepcopy(module, memo)


def _uniform(value, dims: int, what: str, layer: str):
    v = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    if isinstance(value, str) or len(set(v)) != 1:
        raise NotImplementedError(f"to_escnn: the {layer} has {what} {value!r}; escnn's convolutions take one {what} for "
                                  "every axis: build the layer with a single integer")
    return int(v[0])


def _new_escnn_layer(module: nn.Module, gspace):
    """An escnn ``R2Conv``/``R3Conv``/``Linear`` of a declared plain layer's shape, on ``gspace`` (default: the
    escnn gspace of the declared reps' group), its field types built from the declared reps."""
    from ..groups._escnn_out import escnn_field_type, escnn_gspace  # noqa: PLC0415 - needs escnn only here

    d = declaration(module)
    kind = type(module).__name__
    dims = {"Linear": 0, "Conv2d": 2, "Conv3d": 3}.get(kind)
    if dims is None or d is None or d.rep_in is None:
        raise ValueError(f"to_escnn: a {kind} {'declared' if d is not None else 'not declared'} "
                         f"{'without reps' if d is not None else ''}: without like= it converts nn.Conv2d, nn.Conv3d and "
                         "nn.Linear declared with reps (equiproj.nn.declare), and models converted by from_escnn in "
                         "this process; pass like=<the escnn module to fill> otherwise")
    if d.case == "channels":
        raise NotImplementedError(f"to_escnn: the {kind} is declared with kernel_space='channels' (the group acts on its "
                                  "channels only); escnn's convolutions also move the grid, so it has no escnn layer")
    if gspace is None:
        band = max((int(ir.band) for r in (d.rep_in, d.rep_out) for _, f in r.segments for ir in f.slots
                    if isinstance(getattr(ir, "band", None), int)), default=0)
        gspace = escnn_gspace(d.rep_in.group, dims, band)
    elif dims == 0 and gspace.dimensionality != 0:
        from escnn import gspaces  # noqa: PLC0415

        gspace = gspaces.no_base_space(gspace.fibergroup)
    elif gspace.dimensionality != dims:
        raise ValueError(f"to_escnn: the gspace {gspace.name} acts on R^{gspace.dimensionality}, the {kind} on "
                         f"{dims} spatial dimensions")
    from escnn import nn as escnn_nn  # noqa: PLC0415

    t_in, t_out = escnn_field_type(d.rep_in, gspace), escnn_field_type(d.rep_out, gspace)
    bias = module.bias is not None
    if dims == 0:
        return escnn_nn.Linear(t_in, t_out, bias=bias)
    if module.groups != 1:
        raise NotImplementedError(f"to_escnn: a {kind} with groups={module.groups}; convert layers with groups=1")
    if module.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise NotImplementedError(f"to_escnn: padding_mode {module.padding_mode!r} has no escnn counterpart")
    cls = escnn_nn.R2Conv if dims == 2 else escnn_nn.R3Conv
    return cls(t_in, t_out, _uniform(module.kernel_size, dims, "kernel size", kind),
               padding=_uniform(module.padding, dims, "padding", kind), stride=_uniform(module.stride, dims, "stride", kind),
               dilation=_uniform(module.dilation, dims, "dilation", kind), padding_mode=module.padding_mode, bias=bias)


def to_escnn(model: nn.Module, gspace=None, *, like=None, return_residuals: bool = False):
    """The escnn model of a model converted by :func:`from_escnn`, with its current parameters: each
    convolution's and linear map's filter and bias as least-squares coefficients in escnn's basis
    (exact when the layer is in escnn's span, e.g. after :func:`equiproj.nn.project_`), the other
    modules' parameters and statistics copied back.

    Args:
        model: the result of ``from_escnn`` (possibly trained); or a plain ``nn.Conv2d``/``Conv3d``/``Linear``
            declared with reps of a group escnn has (C_N, D_N, SO(2), O(2), SO(3), O(3), O, O_h).
        gspace: for a declared layer without ``like``, the escnn gspace to build it on (its fibre group must
            be the reps' group); default escnn's gspace of that group (``rot2dOnR2(N)``, ``flipRot2dOnR2(N)``,
            ``rot3dOnR3()``, ..., ``no_base_space`` for ``Linear``).
        like: an escnn model of the same architecture to fill (a copy is filled), or for a plain layer the
            escnn ``R2Conv``/``R3Conv``/``Linear`` of its shape. Default: the escnn model ``model`` was
            converted from in this process (a model unpickled or converted in another process needs
            ``like``); for a declared layer, a new escnn layer (``R2Conv``/``R3Conv``/``Linear``) with
            field types built from the declared reps (escnn's irreps, with a change of basis where
            equiproj's basis of a field differs from escnn's) and the layer's kernel size, padding,
            stride, dilation and bias.
        return_residuals: also return ``{path: relative residual}`` of every least-squares solve.

    A relative residual above ``1e-4`` (the layer is not in escnn's basis) warns: project first.

    Example::

        >>> import torch, equiproj
        >>> from escnn import gspaces, nn as escnn_nn
        >>> gs = gspaces.rot2dOnR2(8)
        >>> field_type = escnn_nn.FieldType(gs, 2 * [gs.regular_repr])
        >>> plain = equiproj.nn.from_escnn(escnn_nn.R2Conv(field_type, field_type, kernel_size=5))
        >>> # ... train plain with the penalty, then
        >>> plain = equiproj.nn.project_(plain)
        >>> escnn_again = equiproj.nn.to_escnn(plain)
        >>> G = equiproj.Cyclic(8)                     # a layer declared by hand: escnn's R2Conv is built
        >>> conv = equiproj.nn.declare(torch.nn.Conv2d(3, 16, 5, padding=2), 3 * G.trivial(), 2 * G.regular())
        >>> conv = equiproj.nn.project_(conv)         # into its kernel space (here inside escnn's span)
        >>> escnn_conv, residuals = equiproj.nn.to_escnn(conv, return_residuals=True)
        >>> type(escnn_conv).__name__, max(residuals.values()) < 1e-4
        ('R2Conv', True)
    """
    if gspace is not None and isinstance(gspace, nn.Module):
        raise TypeError("to_escnn: the second argument is an escnn gspace; pass the escnn module to fill as like=")
    converted = any(getattr(m, "escnn_path", None) is not None for m in model.modules())
    if gspace is not None and (converted or like is not None):
        raise ValueError("to_escnn: gspace= is for a declared layer built anew; a model converted by from_escnn (or one "
                         "given like=) is written into its escnn model, whose gspace it keeps")
    if like is None:
        like = _SOURCES.get(model)
    if like is None and not converted:
        like = _new_escnn_layer(model, gspace)
    if like is None:
        raise ValueError("to_escnn needs the escnn model to fill: this model was converted by from_escnn, but not in this "
                         "process (or it was copied); pass like=<an escnn model of the same architecture>")
    out = _copy_escnn(like)
    residuals: dict[str, float] = {}
    if not any(getattr(m, "escnn_path", None) is not None for m in model.modules()):
        # a layer equiproj did not convert: written into an escnn layer of the same kind and shape
        if type(like).__name__ not in _EXPANDED or not isinstance(model, (nn.Linear, nn.modules.conv._ConvNd)):
            raise ValueError(f"to_escnn: {type(model).__name__} was not converted by from_escnn; pass it with like= an "
                             f"escnn R2Conv/R3Conv/Linear of the same shape (got like={type(like).__name__})")
        _write_back(model, out, residuals, "")
    for _, m in model.named_modules():
        path = getattr(m, "escnn_path", None)
        if path is None:
            continue
        dst = out.get_submodule(path) if path else out
        if type(dst).__name__ != m.escnn_class:
            raise ValueError(f"to_escnn: the escnn model has a {type(dst).__name__} at {path!r} where the converted one "
                             f"came from a {m.escnn_class}: pass like= an escnn model of the same architecture")
        _write_back(m, dst, residuals, path)
    out.train(model.training)  # escnn caches its expanded filters in eval mode: refresh them
    worst = max(residuals.values(), default=0.0)
    if worst > 1e-4:
        bad = [p for p, r in residuals.items() if r > 1e-4]
        warnings.warn(f"to_escnn: {bad} are not in escnn's basis (relative least-squares residual up to {worst:.2g}); "
                      "equiproj.nn.project_(model) first puts them there", stacklevel=2)
    return (out, residuals) if return_residuals else out
