"""``declare``: attach to an existing layer how a group acts on it; find the declared layers of a model."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .. import grid as _grid
from .. import translation as _translation
from ..groups._field import monomial_action
from ..groups import Rep, as_rep_pair, check_rep_pair
from ..kernel_spaces import default_kernel_space
from ._declaration import (Declaration, KernelSpaceDeclaration, MatrixDeclaration, StaleDeclaration,
                           TranslationDeclaration)
from ._fields import refuse_library_module
from ._tensors import is_dtensor

__all__ = ["declare", "declare_translations", "undeclare", "declaration", "declared_layers", "select_layers",
           "unwrap", "NoKernelSpaceError"]

_ATTR = "_equiproj_declaration"
#: counts declare / undeclare calls, so that a penalty notices a model whose declarations changed
_epoch = [0]
_GRID_HINT = ("(exact grid actions: subgroups of D4 on square 2-D kernels, Octahedral/FullOctahedral on cubic 3-D "
              "kernels, any group on 1x1 kernels; kernel_space='channels' if G acts on the channels only)")


class NoKernelSpaceError(ValueError, NotImplementedError):
    """A declared convolution whose group has no exact grid action and no kernel space."""


#: the largest input field ⊗ kernel grid that a grid conv builds as one field (a contiguous block of
#: the weight's columns, read in place) when some output field is not regular: such a pair's orbit
#: table (or basis) has d_out times as many entries per field-pair type, and the Triton orbit kernel
#: holds a whole table tile in registers (C4/D4 fields on 3x3 and 5x5 kernels: 36 to 200; irreps of
#: O/O_h on 3x3x3 kernels: 27 to 81). With regular output fields every pair of permutation fields is
#: a product pair (two factor tables, any size: O/O_h regular fields on 3x3x3 kernels, 648 and 1296)
_GRID_FIELD_MAX = 256


#: a field that is neither a permutation field nor monomial takes the whole grid while its basis with an
#: output field stays small: d_in k^s <= this times |G| (the basis has about d_out d_in k^s / |G| maps;
#: the E irreps of O and O_h on 3x3x3 kernels: 54 <= 96 and 192; C3's on 5x5x5: 250 > 12)
_GRID_BASIS_ORBITS = 4


def _whole_grid_field(field, pixels: int) -> bool:
    """Whether ``field ⊗ pixels`` is built as one field (read in place) rather than over the grid's orbits."""
    n = field.dim * pixels
    if n > _GRID_FIELD_MAX:
        return False
    return (field.permutation is not None or monomial_action(field) is not None
            or n <= _GRID_BASIS_ORBITS * field.group.order)


def _check_materialised(module):
    w = getattr(module, "weight", None)
    if isinstance(w, nn.parameter.UninitializedParameter):
        raise ValueError(f"{type(module).__name__} has an uninitialised (lazy) weight: run one forward pass before declare")


def _fmt_shape(k) -> str:
    return "x".join(map(str, k))


def _default_kernel_space(group, kernel_size: tuple[int, ...]):
    """The group's default steerable kernel space for this kernel, or a :class:`NoKernelSpaceError`."""
    s = len(kernel_size)
    what = f"no kernel space for {group} on {s}-D kernels of size {_fmt_shape(kernel_size)} yet"
    size = kernel_size[0] if len(set(kernel_size)) == 1 else kernel_size
    try:
        space = default_kernel_space(group, size, s)
    except Exception as e:  # noqa: BLE001 - any failure means: no kernel space for this layer
        raise NoKernelSpaceError(f"{what}: {type(e).__name__}: {e} {_GRID_HINT}") from e
    return space


def _check_kernel_space(space, module, rep_in, rep_out):
    for meth in ("energies", "project"):
        if not callable(getattr(space, meth, None)):
            raise TypeError(f"kernel_space must provide .energies(weight, rep_in, rep_out) and "
                            f".project(weight, rep_in, rep_out, which=...) (the KernelSpace protocol); "
                            f"{type(space).__name__} has no .{meth}")
    w = module.weight
    if w.device.type == "meta" or is_dtensor(w):
        return
    try:  # mismatched shapes are an error at declare time
        with torch.no_grad():
            e_perp, e_g = space.energies(w.detach(), rep_in, rep_out)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"kernel space {_space_text(space)} rejects the weight {tuple(w.shape)} of this "
                         f"{type(module).__name__} with rep_in={rep_in!r}, rep_out={rep_out!r}: {e}") from e
    if not (isinstance(e_perp, torch.Tensor) and isinstance(e_g, torch.Tensor)):
        raise TypeError(f"kernel space {_space_text(space)}: .energies must return two tensors")


def _space_text(space) -> str:
    d = getattr(space, "describe", None)
    return d() if callable(d) else repr(space)


def declare(module: nn.Module, rep_in: Rep, rep_out: Rep, *, kernel_space=None, bias: bool = True) -> nn.Module:
    """Declare how a group acts on an existing ``nn.Linear`` or ``nn.Conv1d/2d/3d``; returns ``module``.

    Args:
        module: the layer. Its forward pass, parameters, state_dict and speed are unchanged.
        rep_in, rep_out: representations of the same group on the input / output features
            (``rep_in.dim == in_features`` or ``in_channels``, likewise for ``rep_out``).
        kernel_space: convolutions only. ``None`` (default): the exact grid action when the group
            maps the kernel grid onto itself (or the kernel is 1x1), else the group's default
            steerable kernel space (:func:`equiproj.kernel_spaces.default_kernel_space`); ``"grid"``:
            require the exact grid action; ``"channels"``: G acts on the channels only; or an
            object of the :class:`~equiproj.kernel_spaces.KernelSpace` protocol.
        bias: include the bias (a map from the trivial rep to ``rep_out``) in the energies.

    Raises:
        TypeError: not a Linear / (non-transposed) Conv layer, or not Reps.
        ValueError: shapes that do not match the reps, different groups, grouped convolutions.
        NoKernelSpaceError: a conv whose group has neither a grid action nor a kernel space.

    Declaring again replaces the previous declaration. A convolution whose geometry cannot keep
    the grid symmetry is refused (anisotropic stride, dilation or padding under a group that swaps
    axes; asymmetric ``padding="same"``); a strided one is accepted with a warning naming the input
    sizes for which it keeps the symmetry (``(n + 2 padding - K) % stride == 0``, see
    :func:`equiproj.nn.centred_grid`).

    Example::

        >>> import torch, equiproj
        >>> from equiproj.nn import declaration, declare
        >>> G = equiproj.Cyclic(4)
        >>> conv = declare(torch.nn.Conv2d(1, 8, 3), G.trivial(), 2 * G.regular())
        >>> declaration(conv).case
        'grid'
    """
    refuse_library_module(module, "declare")
    rep_in, rep_out = as_rep_pair(rep_in, rep_out)
    check_rep_pair(rep_in, rep_out)
    if not isinstance(module, nn.Module):
        raise TypeError(f"declare needs an nn.Module, got {type(module).__name__}")
    if _translation.is_locally_connected(module):
        raise TypeError(f"{type(module).__name__} is declared with equiproj.nn.declare_translations(module)")
    _check_materialised(module)
    G = rep_out.group
    if isinstance(module, nn.Linear):
        if kernel_space is not None:
            raise ValueError("kernel_space applies to convolutions only, not nn.Linear")
        shape = tuple(module.weight.shape)
        if shape != (rep_out.dim, rep_in.dim):
            raise ValueError(f"nn.Linear weight has shape {shape} = (out_features, in_features) but "
                             f"(rep_out.dim, rep_in.dim) = ({rep_out.dim}, {rep_in.dim})")
        decl = MatrixDeclaration("linear", rep_in, rep_out, rep_in, shape, bias, 0, f"linear map, exact ({G})")
    elif isinstance(module, _ConvNd):
        if module.transposed:
            raise TypeError(f"{type(module).__name__}: transposed convolutions are not supported")
        if module.groups != 1:
            raise ValueError(f"{type(module).__name__} has groups={module.groups}: only groups=1 convolutions "
                             "can be declared (a grouped conv is not one dense map from rep_in to rep_out)")
        if module.in_channels != rep_in.dim or module.out_channels != rep_out.dim:
            raise ValueError(f"{type(module).__name__}({module.in_channels}, {module.out_channels}, ...) does not match "
                             f"rep_in.dim = {rep_in.dim}, rep_out.dim = {rep_out.dim}")
        decl = _conv_declaration(module, rep_in, rep_out, kernel_space, bias)
    else:
        raise TypeError(f"declare supports nn.Linear and nn.Conv1d/2d/3d, got {type(module).__name__}")
    module.__dict__[_ATTR] = decl
    _epoch[0] += 1
    return module


def _conv_declaration(module, rep_in, rep_out, kernel_space, bias) -> Declaration:
    G = rep_out.group
    k = tuple(int(v) for v in module.kernel_size)
    s = len(k)
    shape = tuple(module.weight.shape)
    if shape != (rep_out.dim, rep_in.dim) + k:  # guards against a swapped weight
        raise ValueError(f"conv weight has shape {shape}, expected {(rep_out.dim, rep_in.dim) + k}")
    ks = _fmt_shape(k)
    if kernel_space != "channels" and G.ambient_dim == s:
        _check_conv_geometry(module, G, k)
    if kernel_space == "channels":
        rep_pix = math.prod(k) * G.trivial()
        return MatrixDeclaration("channels", rep_in, rep_out, rep_in @ rep_pix, shape, bias, s,
                                 f"channels only: {G} acts on the channels, each tap of the {ks} kernel separately (exact)")
    if isinstance(kernel_space, str) and kernel_space != "grid":
        raise ValueError(f"kernel_space must be None, 'grid', 'channels' or a kernel-space object, got {kernel_space!r}")
    if kernel_space is None or kernel_space == "grid":
        if math.prod(k) == 1:
            return MatrixDeclaration("pointwise", rep_in, rep_out, rep_in, shape, bias, s,
                                     f"{ks} conv, exact ({G} acts on the channels of a single kernel point)")
        if _grid.has_grid_action(G, k):
            # rep_in ⊗ pixels as one field per input copy, a contiguous block of the weight's columns read
            # in place: for permutation input fields and regular output fields (factor tables), or while
            # the fields stay small: orbit tables for permutation fields, signed orbit tables for monomial
            # ones (the irreps of C4/D4), a basis for the others while it stays small (E of O/O_h); larger
            # fields take the grid's orbits
            regular_out = all(f.permutation is not None and f.permutation.regular for _, f in rep_out.segments)
            whole = all((f.permutation is not None and regular_out) or _whole_grid_field(f, math.prod(k))
                        for _, f in rep_in.segments)
            return MatrixDeclaration("grid", rep_in, rep_out, rep_in @ _grid.kernel_rep(G, k, orbits=not whole), shape,
                                     bias, s,
                                     f"exact grid action: {G} permutes the {ks} kernel grid")
        if kernel_space == "grid":
            raise ValueError(f"{G} does not map the {ks} kernel grid of this {s}-D conv onto itself: no exact grid "
                             "action (exact: subgroups of D4 on square 2-D kernels, Octahedral/FullOctahedral on cubic "
                             "3-D kernels, any group on 1x1 kernels)")
        kernel_space = _default_kernel_space(G, k)
    _check_kernel_space(kernel_space, module, rep_in, rep_out)
    return KernelSpaceDeclaration(rep_in, rep_out, kernel_space, shape, bias, s, _space_text(kernel_space))


def _swaps_axes(group) -> bool:
    """Whether some element of the group mixes the grid's axes (a rotation by 90 degrees, say)."""
    g = group.generators()
    off = g - torch.diag_embed(g.diagonal(dim1=-2, dim2=-1))
    return bool((off.abs() > 1e-9).any())


def _check_conv_geometry(module, group, k: tuple[int, ...]) -> None:
    """Refuse a conv whose stride, dilation or padding can never keep the grid symmetry; warn for a
    strided one, which keeps it only for some input sizes."""
    name = type(module).__name__
    stride, dilation = tuple(module.stride), tuple(module.dilation)
    padding = module.padding
    if isinstance(padding, str):
        if padding == "same" and any((d * (kk - 1)) % 2 for d, kk in zip(dilation, k)):
            raise ValueError(f"{name}: padding='same' with an even effective kernel pads one side more than the other, "
                             f"which moves the output off the grid's centre: {group} cannot act on it; use an odd "
                             "kernel or explicit symmetric padding")
        padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k)) if padding == "same" else (0,) * len(k)
    padding = tuple(padding)
    if _swaps_axes(group) and (len(set(k)) > 1 or len(set(stride)) > 1 or len(set(dilation)) > 1
                               or len(set(padding)) > 1):
        raise ValueError(f"{name}(kernel_size={k}, stride={stride}, dilation={dilation}, padding={padding}) treats the "
                         f"axes differently, but {group} maps one axis onto another: the layer cannot commute with its "
                         "rotations; use the same kernel size, stride, dilation and padding on every axis")
    conditions = dict.fromkeys(  # per strided axis (the axes agree when the group swaps them)
        (s, p, d * (kk - 1) + 1) for s, p, d, kk in zip(stride, padding, dilation, k) if s > 1)
    if conditions:
        axes = "" if len(stride) == 1 or len(set(stride)) == 1 else f" on axes {[i for i, s in enumerate(stride) if s > 1]}"
        rule = " and ".join(f"(n + 2*{p} - {K}) % {s} == 0, i.e. n % {s} == {(K - 2 * p) % s}" for s, p, K in conditions)
        warnings.warn(f"{name}: a stride of {max(stride)}{axes} keeps the grid symmetry of {group} only for input sizes "
                      f"n with {rule} (the sampled positions are then symmetric about the grid's centre); other sizes "
                      "break it (equiproj.nn.centred_grid checks a size)", UserWarning, stacklevel=4)


def declare_translations(module: nn.Module, *, bias: bool = True) -> nn.Module:
    """Declare that a periodic locally connected layer (:class:`equiproj.translation.LocallyConnected1d`
    or ``2d``) should be translation equivariant, i.e. a convolution; returns ``module``.

    Its energies are those of :func:`equiproj.translation.energies` (exact); the bias counts too
    (a translation-equivariant bias is the same at every position)."""
    if not _translation.is_locally_connected(module):
        raise TypeError(f"declare_translations needs an equiproj.translation.LocallyConnected1d/2d, got "
                        f"{type(module).__name__}")
    desc = (f"translations of the periodic {_fmt_shape(module.size)} grid, exact (equivariant iff a convolution "
            f"with {_fmt_shape(module.kernel_size)} kernels)")
    module.__dict__[_ATTR] = TranslationDeclaration(tuple(module.weight.shape), bias, module.spatial_dims, desc)
    _epoch[0] += 1
    return module


def undeclare(module: nn.Module) -> nn.Module:
    """Remove a declaration (no-op if there is none); returns ``module``."""
    if module.__dict__.pop(_ATTR, None) is not None:
        _epoch[0] += 1
    return module


def declaration(module: nn.Module) -> Declaration | None:
    """The module's :class:`Declaration`, or ``None`` if it is not declared."""
    d = module.__dict__.get(_ATTR)
    if isinstance(d, StaleDeclaration):
        raise ValueError(f"{type(module).__name__} was unpickled from a file written without its declaration "
                         f"({d.text}): call equiproj.nn.declare on it again")
    return d


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers (for layer names)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def declared_layers(model: nn.Module) -> list[tuple[str, nn.Module, Declaration]]:
    """Every declared layer of ``model`` as ``(name, module, declaration)``, in ``named_modules`` order
    (names relative to the model inside DDP / ``torch.compile`` wrappers; the root is ``""``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(name, m, declaration(m)) for name, m in unwrap(model).named_modules() if _ATTR in m.__dict__]


def select_layers(model, layers) -> list[tuple[str, nn.Module, Declaration]]:
    """The declared layers named or given in ``layers`` (all of them for ``None``), with clear errors."""
    found = declared_layers(model)
    if layers is None:
        if not found:
            raise ValueError(f"{type(unwrap(model)).__name__} has no declared layers: call equiproj.nn.declare(layer, "
                             "rep_in, rep_out) on its Linear/Conv layers first")
        return found
    by_name = {n: (n, m, d) for n, m, d in found}
    by_id = {id(m): (n, m, d) for n, m, d in found}
    named = dict(unwrap(model).named_modules())
    out = []
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    for x in layers:
        if isinstance(x, str):
            if x not in named:
                raise ValueError(f"model has no layer named {x!r}")
            if x not in by_name:
                raise ValueError(f"layer {x!r} ({type(named[x]).__name__}) is not declared: call equiproj.nn.declare on it")
            out.append(by_name[x])
        elif isinstance(x, nn.Module):
            if id(x) not in by_id:
                what = "is not part of the model" if all(x is not m for m in named.values()) else "is not declared"
                raise ValueError(f"layer {type(x).__name__} {what}: call equiproj.nn.declare on it")
            out.append(by_id[id(x)])
        else:
            raise TypeError(f"layers must be module names or modules, got {type(x).__name__}")
    if not out:
        raise ValueError("layers is empty")
    return out
