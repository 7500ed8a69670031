"""The fused penalty op: E_perp, E_G (and the penalty gradient) of many layers in one pass over each.

``torch.ops.equiproj.fused_energies`` is a ``torch.library.custom_op`` over plain tensors: the
weights ``W_i`` ``[..., m_i, n_i]`` (any strides; leading dims are a batch) and the packed plan of
each (:class:`~equiproj._plan.PackedPlan`: ``meta``, ``basis``, ``perm_out``, ``perm_in``), plus
optional coefficients. The schema is declared once (here); a kernel is registered per device:

* CPU: the C++ extension ``equiproj._C`` (``csrc/``, ``torch.ops.equiproj_cpu.fused_energies``),
  all of fp16/bf16/fp32/fp64, tiles in float64, parallel over row blocks;
* CUDA: the Triton kernels of :mod:`equiproj.kernels` for fp16/bf16/fp32;
* anything else (float64 on CUDA, triton or the extension missing): the kernels' pure-torch twin.

The fake implementation and the autograd formula are registered in Python. Energies are float32
for fp16/bf16/fp32 weights and float64 for float64 weights, one per matrix, with a fixed
reduction order (bitwise reproducible on one device).

Autograd: the forward computes energies only. The backward runs the op once more with the
incoming gradients as coefficients, ``dW = 2 g_perp (W - P W) + 2 g_G P W``: one pass that reads
W and writes dW, for any incoming gradients (also per matrix of a batch). Double backward is not
supported (use ``backend="torch"``). When the coefficients are known up front (a penalty's
lambdas), :func:`fused_energies_and_grads` runs the op once with them: energies and gradients
from one read of W and one write of dW, no autograd graph (``equiproj.energies_and_grad``,
``ProjectionPenalty.backward``). Writing ``W - P W`` in an autograd forward instead would cost a
scaling pass in backward: four passes instead of three.

Example::

    >>> from equiproj._plan import plan_for
    >>> G = equiproj.SO3(); r = equiproj.Rep.parse(G, "4x0 + 2x1")
    >>> W = torch.randn(10, 10, requires_grad=True)
    >>> (e_perp,), (e_g,) = fused_energies([W], [plan_for(r, r, W.device)])
    >>> e_perp.backward()  # W.grad = 2 (W - P W)

Under ``torch.compile`` (also ``fullgraph=True``) the op is one graph node.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .._caches import ByteBoundedCache
from .._plan import PackedPlan
from ..kernels.inputs import accumulation_dtype, autocast_off
from ._availability import cpp_available, triton_kernels

__all__ = ["fused_energies", "fused_energies_and_grads", "fused_energies_and_grad", "as_coefficient",
           "accumulation_dtype", "run_twin"]


# ---------------------------------------------------------------------------------------------
# the custom op
# ---------------------------------------------------------------------------------------------
# The Triton side caches its schedules per PackedPlan object: remember which plan each meta tensor
# came from, so that the CUDA kernel gets the caller's plan objects back.
# Bounded by the bytes of the plans it holds (equiproj._caches).
_PLANS_BY_META = ByteBoundedCache("plans by meta tensor")


def _remember(plans) -> None:
    for P in plans:
        key = id(P.meta)
        if _PLANS_BY_META.get(key) is not P:
            _PLANS_BY_META.put(key, P)  # holding P keeps P.meta alive, so its id is not reused


def _plans_from_tensors(weights, meta, basis, perm_out, perm_in) -> list[PackedPlan]:
    plans = []
    for W, mt, b, po, pi in zip(weights, meta, basis, perm_out, perm_in):
        P = _PLANS_BY_META.get(id(mt))
        if P is None or P.meta is not mt or P.basis is not b or P.perm_out is not po or P.perm_in is not pi:
            m, n = W.shape[-2], W.shape[-1]
            ident = bool(torch.equal(po.cpu(), torch.arange(m)) and torch.equal(pi.cpu(), torch.arange(n)))
            P = PackedPlan(m, n, mt, b, po, pi, ident)
        plans.append(P)
    return plans


def _triton_supports(k, P: PackedPlan) -> bool:
    """``equiproj.kernels.supports(P)``, cached on the plan (it reads the plan's rows on the host)."""
    if "triton_supports" not in P._cache:
        P._cache["triton_supports"] = bool(k.supports(P))
    return P._cache["triton_supports"]


def _check_op_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g) -> None:
    L = len(weights)
    if not (len(meta) == len(basis) == len(perm_out) == len(perm_in) == L):
        raise ValueError(f"fused_energies: got {L} weights but {len(meta)} meta, {len(basis)} basis, "
                         f"{len(perm_out)} perm_out, {len(perm_in)} perm_in tensors")
    if len(c_perp) != len(c_g) or (c_perp and len(c_perp) != L):
        raise ValueError("fused_energies: c_perp and c_g must both be empty or both hold one tensor per weight")


def _twin(weights, meta, basis, perm_out, perm_in, c_perp, c_g):
    """The op's contract through the pure-torch twin."""
    return run_twin(weights, _plans_from_tensors(weights, meta, basis, perm_out, perm_in), c_perp, c_g)


def run_twin(weights, plans, c_perp, c_g):
    """:func:`equiproj.kernels.torch_fused_energies` with the op's contract: ``c_perp``/``c_g`` empty
    or one tensor per weight with one coefficient per matrix (``W.shape[:-2]``)."""
    from ..kernels.torch_twin import torch_fused_energies  # noqa: PLC0415 - equiproj.kernels imports _plan only

    with autocast_off(weights[0].device if weights else "cpu"):  # the twin's dtypes; stacking mixed half dtypes
        flat_w, flat_p, flat_cp, flat_cg, counts = _flatten_batches(weights, plans, c_perp, c_g)
        ep, eg, gr = torch_fused_energies(flat_w, flat_p, flat_cp, flat_cg)
        return _unflatten(weights, counts, ep, eg, gr)


def _flatten_batches(weights, plans, c_perp, c_g):
    """Per-matrix coefficients in the ``[L]`` contract of equiproj.kernels: a batched weight with
    gradients becomes one entry per matrix (views), each with its own coefficient."""
    want_grad = bool(c_perp)
    if not want_grad:
        return list(weights), list(plans), None, None, None
    flat_w, flat_p, cps, cgs, counts = [], [], [], [], []
    for W, P, cp, cg in zip(weights, plans, c_perp, c_g):
        if W.dim() == 2:
            flat_w.append(W)
            flat_p.append(P)
            counts.append(0)
        else:
            mats = W.reshape((-1,) + W.shape[-2:]) if W.numel() else W.new_empty((0,) + W.shape[-2:])
            # reshape copies only when the batch dims cannot be merged; either way rows are views or copies of W
            flat_w.extend(mats.unbind(0))
            flat_p.extend([P] * mats.shape[0])
            counts.append(mats.shape[0])
        cps.append(cp.reshape(-1))
        cgs.append(cg.reshape(-1))
    dev = weights[0].device
    cdt = torch.float64 if any(W.dtype == torch.float64 for W in weights) else torch.float32
    cat = lambda cs: torch.cat(cs).to(device=dev, dtype=cdt) if cs else torch.zeros(0, device=dev)  # noqa: E731
    return flat_w, flat_p, cat(cps), cat(cgs), counts


def _unflatten(weights, counts, ep, eg, gr):
    """The per-matrix results of :func:`_flatten_batches` back per weight (``gr=None``: energies only)."""
    if counts is None:
        return list(ep), list(eg), []
    out_p, out_g, out_gr, k = [], [], [], 0
    for W, c in zip(weights, counts):
        if W.dim() == 2:
            out_p.append(ep[k])
            out_g.append(eg[k])
            if gr is not None:
                out_gr.append(gr[k])
            k += 1
        else:
            batch = W.shape[:-2]
            dt = accumulation_dtype(W.dtype)
            if c:
                out_p.append(torch.stack(ep[k : k + c]).reshape(batch))
                out_g.append(torch.stack(eg[k : k + c]).reshape(batch))
                if gr is not None:
                    out_gr.append(torch.stack(gr[k : k + c]).reshape(W.shape))
            else:
                out_p.append(W.new_zeros(batch, dtype=dt))
                out_g.append(W.new_zeros(batch, dtype=dt))
                if gr is not None:
                    out_gr.append(torch.zeros_like(W, memory_format=torch.contiguous_format))
            k += c
    return out_p, out_g, out_gr


@torch.library.custom_op("equiproj::fused_energies", mutates_args=())
def _fused_energies_op(weights: list[Tensor], meta: list[Tensor], basis: list[Tensor], perm_out: list[Tensor],
                       perm_in: list[Tensor], c_perp: list[Tensor], c_g: list[Tensor]
                       ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``(e_perp, e_g, grads)`` of ``weights`` under their packed plans (one tensor of each kind per
    weight). ``c_perp``/``c_g``: empty (no gradients; ``grads`` is empty) or one tensor per weight
    with one coefficient per matrix (shape ``W.shape[:-2]``); then
    ``grads[i] = 2 c_perp_i (W_i - P W_i) + 2 c_g_i P W_i`` (contiguous, W_i's dtype).
    Default implementation (devices without a kernel): the pure-torch twin."""
    _check_op_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g)
    return _twin(weights, meta, basis, perm_out, perm_in, c_perp, c_g)


@_fused_energies_op.register_kernel("cpu")
def _fused_energies_cpu(weights, meta, basis, perm_out, perm_in, c_perp, c_g):
    _check_op_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g)
    if not cpp_available():
        return _twin(weights, meta, basis, perm_out, perm_in, c_perp, c_g)
    ep, eg, gr = torch.ops.equiproj_cpu.fused_energies(weights, meta, basis, perm_out, perm_in, c_perp, c_g, [])
    return list(ep), list(eg), list(gr)


@_fused_energies_op.register_kernel("cuda")
def _fused_energies_cuda(weights, meta, basis, perm_out, perm_in, c_perp, c_g):
    _check_op_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g)
    k = triton_kernels()
    if (k is None or not k.HAS_TRITON or any(W.dtype == torch.float64 for W in weights)):
        return _twin(weights, meta, basis, perm_out, perm_in, c_perp, c_g)
    plans = _plans_from_tensors(weights, meta, basis, perm_out, perm_in)
    if not all(_triton_supports(k, P) for P in plans):  # fields wider than the kernel's largest tile
        return _twin(weights, meta, basis, perm_out, perm_in, c_perp, c_g)
    with autocast_off("cuda"):  # an autocast region of the caller would refuse to stack mixed half dtypes
        flat_w, flat_p, cp, cg, counts = _flatten_batches(weights, plans, c_perp, c_g)
        ep, eg, gr = k.fused_energies(flat_w, flat_p, cp, cg)
        return _unflatten(weights, counts, ep, eg, gr)


@torch.library.custom_op("equiproj::fused_energies_accumulate", mutates_args=("outs",))
def _fused_accumulate_op(weights: list[Tensor], meta: list[Tensor], basis: list[Tensor], perm_out: list[Tensor],
                         perm_in: list[Tensor], c_perp: list[Tensor], c_g: list[Tensor], outs: list[Tensor]
                         ) -> tuple[list[Tensor], list[Tensor]]:
    """``(e_perp, e_g)`` as :func:`_fused_energies_op`, and ``outs[i] += 2 c_perp_i (W_i - P W_i) + 2 c_g_i P W_i``
    in place, no fresh buffer (``outs[i]`` of W_i's shape and dtype; it may be ``W_i`` itself: each
    tile is read before it is written). Default implementation: the pure-torch twin."""
    _check_accumulate_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs)
    return _twin_accumulate(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs)


@_fused_accumulate_op.register_kernel("cpu")
def _fused_accumulate_cpu(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs):
    _check_accumulate_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs)
    if not cpp_available() or not all(o.is_contiguous() and o.dtype == W.dtype for o, W in zip(outs, weights)):
        return _twin_accumulate(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs)
    ep, eg, _ = torch.ops.equiproj_cpu.fused_energies(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs)
    return list(ep), list(eg)


@_fused_accumulate_op.register_kernel("cuda")
def _fused_accumulate_cuda(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs):
    _check_accumulate_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs)
    k = triton_kernels()
    plans = _plans_from_tensors(weights, meta, basis, perm_out, perm_in)
    if (k is None or not k.HAS_TRITON or any(W.dtype == torch.float64 for W in weights)
            or not all(_triton_supports(k, P) for P in plans)
            or not all(o.is_contiguous() and o.dtype == W.dtype for o, W in zip(outs, weights))):
        return _twin_accumulate(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs)
    flat_w, flat_p, cp, cg, counts = _flatten_batches(weights, plans, c_perp, c_g)
    flat_o = []  # the same per-matrix views as _flatten_batches makes of the weights
    for o, W in zip(outs, weights):
        flat_o += [o] if W.dim() == 2 else list(o.reshape((-1,) + W.shape[-2:]).unbind(0))
    ep, eg, _ = k.fused_energies(flat_w, flat_p, cp, cg, outs=flat_o)
    out_p, out_g, _ = _unflatten(weights, counts, ep, eg, None)
    return out_p, out_g


@_fused_accumulate_op.register_fake
def _fused_accumulate_fake(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs):
    _check_accumulate_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs)
    ep = [W.new_empty(W.shape[:-2], dtype=accumulation_dtype(W.dtype)) for W in weights]
    eg = [W.new_empty(W.shape[:-2], dtype=accumulation_dtype(W.dtype)) for W in weights]
    return ep, eg


def _check_accumulate_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs) -> None:
    _check_op_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g)
    if len(outs) != len(weights) or len(c_perp) != len(weights):
        raise ValueError("fused_energies_accumulate: need one coefficient pair and one output per weight")
    for i, (o, W) in enumerate(zip(outs, weights)):
        if o.shape != W.shape or o.device != W.device:
            raise ValueError(f"outs[{i}] must have the shape {tuple(W.shape)} and device of its weight, got "
                             f"{tuple(o.shape)} on {o.device}")


def _twin_accumulate(weights, meta, basis, perm_out, perm_in, c_perp, c_g, outs):
    """The accumulating contract through the pure-torch twin (a fresh gradient, then added)."""
    ep, eg, gr = _twin(weights, meta, basis, perm_out, perm_in, c_perp, c_g)
    for o, g in zip(outs, gr):
        o.add_(g.to(o.dtype))
    return ep, eg


@_fused_energies_op.register_fake
def _fused_energies_fake(weights, meta, basis, perm_out, perm_in, c_perp, c_g):
    _check_op_args(weights, meta, basis, perm_out, perm_in, c_perp, c_g)
    ep = [W.new_empty(W.shape[:-2], dtype=accumulation_dtype(W.dtype)) for W in weights]
    eg = [W.new_empty(W.shape[:-2], dtype=accumulation_dtype(W.dtype)) for W in weights]
    gr = [W.new_empty(W.shape) for W in weights] if c_perp else []
    return ep, eg, gr


def _setup_context(ctx, inputs, output):
    weights, meta, basis, perm_out, perm_in, c_perp, c_g = inputs
    ctx.num_layers = len(weights)
    ctx.num_coefficients = len(c_perp)
    ctx.save_for_backward(*weights, *meta, *basis, *perm_out, *perm_in)
    if output[2]:
        ctx.mark_non_differentiable(*output[2])


_NO_DOUBLE_BACKWARD = ("equiproj::fused_energies does not support double backward (create_graph=True); "
                       "use backend='torch' for higher derivatives")


def _backward(ctx, grad_e_perp, grad_e_g, grad_grads):
    """``dW_i = 2 g_perp_i (W_i - P W_i) + 2 g_G_i P W_i``: the op with the incoming gradients as
    coefficients (unused outputs arrive as zeros)."""
    if torch.is_grad_enabled():
        raise RuntimeError(_NO_DOUBLE_BACKWARD)
    L, nc = ctx.num_layers, ctx.num_coefficients
    saved = ctx.saved_tensors
    weights, meta, basis, perm_out, perm_in = (list(saved[k * L : (k + 1) * L]) for k in range(5))

    def coefficients(grads):
        return [g if g is not None else W.new_zeros(W.shape[:-2], dtype=accumulation_dtype(W.dtype))
                for g, W in zip(grads, weights)]

    _, _, dW = _fused_energies_op(weights, meta, basis, perm_out, perm_in, coefficients(grad_e_perp),
                                  coefficients(grad_e_g))
    none = [None] * L
    return list(dW), none, none, none, none, [None] * nc, [None] * nc


_fused_energies_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the differentiable entry point
# ---------------------------------------------------------------------------------------------
def _check_weights(weights: list, plans: list) -> torch.device:
    """Validate (weights, plans) for the op; returns their common device (None if there are none)."""
    if len(weights) != len(plans):
        raise ValueError(f"got {len(weights)} weights but {len(plans)} plans")
    dev = weights[0].device if weights else None
    for i, (W, P) in enumerate(zip(weights, plans)):
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(W).__name__}")
        if not isinstance(P, PackedPlan):
            raise TypeError(f"plans[{i}] must be a PackedPlan, got {type(P).__name__}")
        if W.device != dev:
            raise ValueError(f"all weights must be on one device: weights[0] is on {dev}, weights[{i}] on {W.device}")
        if W.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"weights[{i}] has dtype {W.dtype}; expected float16, bfloat16, float32 or float64")
        if W.dim() < 2 or tuple(W.shape[-2:]) != (P.m, P.n):
            raise ValueError(f"weights[{i}] must have shape [..., {P.m}, {P.n}], got {tuple(W.shape)}")
    return dev


def fused_energies(weights, plans) -> tuple[list[Tensor], list[Tensor]]:
    """``(E_perp, E_G)`` of many weights through ``equiproj::fused_energies``, differentiable.

    Args:
        weights: L tensors, the i-th ``[..., m_i, n_i]`` (any strides), all on one device.
        plans: L :class:`~equiproj.plan.PackedPlan` (from :func:`packed_plan`), the i-th for W_i.
    Returns:
        two lists of L tensors ``[...]`` (float32, or float64 for float64 weights). The op is
        called once for all layers (a constant number of kernel launches).
    """
    weights, plans = list(weights), list(plans)
    dev = _check_weights(weights, plans)
    if not weights:
        return [], []
    if torch.compiler.is_compiling():  # the registered op: one graph node with fake impl and autograd
        ep, eg, _ = _fused_energies_op(weights, [P.meta for P in plans], [P.basis for P in plans],
                                       [P.perm_out for P in plans], [P.perm_in for P in plans], [], [])
        return list(ep), list(eg)
    _remember(plans)
    L = len(weights)
    out = _EagerFusedEnergies.apply(_eager_kernel(dev), plans, *weights)
    return list(out[:L]), list(out[L:])


def fused_energies_and_grads(weights, plans, c_perp, c_g, outs=None) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``(E_perp, E_G, grads)`` of many weights from one kernel call, without an autograd graph:
    ``grads[i] = 2 c_perp_i (W_i - P W_i) + 2 c_g_i P W_i``, the gradient of
    ``sum_i c_perp_i E_perp_i + c_g_i E_G_i``.

    Each weight is read once and its gradient written once. The differentiable
    :func:`fused_energies` reads each weight twice (forward, then backward): its forward cannot
    know the incoming gradient, and writing ``W - P W`` there would cost a scaling pass later.

    Args:
        weights, plans: as in :func:`fused_energies` (weights are not differentiated through).
        c_perp, c_g: L coefficients, each a number or a tensor broadcastable to ``W_i.shape[:-2]``.
        outs: ``None``, or L tensors (``W_i``'s shape and dtype) to which the gradients are added in
            place instead of being returned in fresh buffers: e.g. existing ``.grad`` tensors, or the
            weights themselves for a decoupled step ``W <- W - rate (W - P W)``
            (``c_perp = -rate / 2``). Contiguous outputs take the fused kernels' one pass; others
            get a fresh gradient added.
    Returns:
        two lists of L energies ``[...]`` (float32, or float64 for float64 weights) and L gradients
        (``W_i``'s shape and dtype, contiguous; with ``outs``: ``outs`` itself).
    """
    weights, plans = list(weights), list(plans)
    dev = _check_weights(weights, plans)
    c_perp, c_g = list(c_perp), list(c_g)
    if len(c_perp) != len(weights) or len(c_g) != len(weights):
        raise ValueError(f"need one c_perp and one c_g per weight: got {len(weights)} weights, "
                         f"{len(c_perp)} c_perp, {len(c_g)} c_g")
    if not weights:
        return [], [], []
    weights = [W.detach() for W in weights]
    cps = [as_coefficient(c, W, f"c_perp[{i}]") for i, (c, W) in enumerate(zip(c_perp, weights))]
    cgs = [as_coefficient(c, W, f"c_g[{i}]") for i, (c, W) in enumerate(zip(c_g, weights))]
    args = (weights, [P.meta for P in plans], [P.basis for P in plans], [P.perm_out for P in plans],
            [P.perm_in for P in plans], cps, cgs)
    with torch.no_grad():
        if outs is not None:
            outs = list(outs)
            if torch.compiler.is_compiling():
                ep, eg = _fused_accumulate_op(*args, outs)
            else:
                _remember(plans)
                ep, eg = _eager_accumulate_kernel(dev)(*args, outs)
            return list(ep), list(eg), outs
        if torch.compiler.is_compiling():
            ep, eg, gr = _fused_energies_op(*args)
        else:
            _remember(plans)
            ep, eg, gr = _eager_kernel(dev)(*args)
    return list(ep), list(eg), list(gr)


def fused_energies_and_grad(W: Tensor, plan: PackedPlan, c_perp: Tensor, c_g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fused_energies_and_grads` of one weight whose arguments the caller has checked
    (``W`` matches ``plan``; ``c_perp``, ``c_g`` from :func:`as_coefficient`): the per-call cost of
    a small layer is mostly Python, so the list plumbing is skipped."""
    if torch.compiler.is_compiling():
        (ep,), (eg,), (gr,) = fused_energies_and_grads([W], [plan], [c_perp], [c_g])
        return ep, eg, gr
    _remember((plan,))
    ep, eg, gr = _eager_kernel(W.device)([W.detach()], [plan.meta], [plan.basis], [plan.perm_out], [plan.perm_in],
                                         [c_perp], [c_g])
    return ep[0], eg[0], gr[0]


@functools.lru_cache(maxsize=256)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def as_coefficient(c, W: Tensor, name: str) -> Tensor:
    """``c`` as a tensor of shape ``W.shape[:-2]`` in the accumulation dtype, on W's device."""
    if (isinstance(c, Tensor) and c.shape == W.shape[:-2] and c.dtype == accumulation_dtype(W.dtype)
            and c.device == W.device):
        return c
    if isinstance(c, bool) or not isinstance(c, (int, float, Tensor)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(c).__name__}")
    if not isinstance(c, Tensor):
        if not math.isfinite(c):
            raise ValueError(f"{name} must be finite, got {c!r}")
        if W.dim() == 2:  # the common case: a cached scalar tensor (building one costs as much as a small kernel)
            return _scalar(float(c), accumulation_dtype(W.dtype), W.device)
    t = torch.as_tensor(c, dtype=accumulation_dtype(W.dtype), device=W.device)
    try:
        return t.expand(W.shape[:-2])
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, not broadcastable to the batch shape "
                         f"{tuple(W.shape[:-2])} of its weight") from None


def _eager_accumulate_kernel(device: torch.device):
    """The accumulating op's implementation for ``device``."""
    if device.type == "cpu":
        return _fused_accumulate_cpu
    if device.type == "cuda":
        return _fused_accumulate_cuda
    return _fused_accumulate_op._init_fn


def _eager_kernel(device: torch.device):
    """The op's implementation for ``device`` (what the dispatcher would run)."""
    if device.type == "cpu":
        return _fused_energies_cpu
    if device.type == "cuda":
        return _fused_energies_cuda
    return _fused_energies_op._init_fn  # the default (pure-torch twin)


class _EagerFusedEnergies(torch.autograd.Function):
    """Eager twin of the registered op's autograd: the same kernels and the same backward
    (one more kernel call with the incoming gradients as coefficients), without the custom op's
    Python dispatch and pytree wrapping, which cost many times the kernel on a small layer
    (``kernels/NOTES.md``). ``torch.compile`` and ``opcheck`` use the registered op."""

    @staticmethod
    def forward(ctx, kernel, plans, *weights):
        ctx.kernel, ctx.plans = kernel, plans
        ctx.save_for_backward(*weights)
        ep, eg, _ = kernel(list(weights), [P.meta for P in plans], [P.basis for P in plans],
                           [P.perm_out for P in plans], [P.perm_in for P in plans], [], [])
        return (*ep, *eg)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        weights, plans = ctx.saved_tensors, ctx.plans
        L = len(weights)

        def coefficients(gs):
            return [g if g is not None else W.new_zeros(W.shape[:-2], dtype=accumulation_dtype(W.dtype))
                    for g, W in zip(gs, weights)]

        _, _, dW = ctx.kernel(list(weights), [P.meta for P in plans], [P.basis for P in plans],
                              [P.perm_out for P in plans], [P.perm_in for P in plans],
                              coefficients(grads[:L]), coefficients(grads[L:]))
        return (None, None, *dW)
