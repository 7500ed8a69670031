"""The fused penalty op: E_perp, E_G (and the penalty gradient) of many layers in one pass over each.

``torch.ops.equiproj.fused_energies`` has one schema, declared once (here)::

    fused_energies(Tensor[] weights, Tensor[] meta, Tensor[] basis, Tensor[] perm_out, Tensor[] perm_in,
                   Tensor[] lambda_perp, Tensor[] lambda_G, Tensor(a!)[] grads, bool accumulate) -> (Tensor, Tensor)

over plain tensors: the weights ``W_i`` ``[..., m_i, n_i]`` (any strides; leading dims are a batch),
the packed plan of each (:class:`~equiproj._plan.PackedPlan`: ``meta``, ``basis``, ``perm_out``,
``perm_in``) and optional coefficients. It returns the energies ``(e_perp, e_g)`` of every matrix
of every weight in two flat tensors (weight by weight, each batch in row-major order; float64 if a
weight is float64, else float32), and it writes the gradients into the tensors it is given:

* ``lambda_perp``/``lambda_G``/``grads`` empty: energies only;
* one coefficient tensor per weight (one value per matrix, shape ``W_i.shape[:-2]``) and one
  contiguous tensor per weight in ``grads`` (W_i's dtype and number of elements, any shape: a
  parameter's own ``.grad`` where ``W_i`` is its matrix view):
  ``grads[i] (+)= 2 lambda_perp_i (W_i - P W_i) + 2 lambda_G_i P W_i``, added in place with
  ``accumulate`` (an existing ``.grad``, or ``W_i`` itself for the decoupled step: each tile is
  read before it is written), written otherwise (a fresh buffer).

The outputs are plain tensors and the gradients go into declared mutated arguments, so the op is
functionalized by ``torch.compile`` (a mutating op cannot return lists of tensors there).

One implementation per device: CPU, the C++ kernel of ``equiproj._C`` (``csrc/``, registered for
this op when the extension loads; all of fp16/bf16/fp32/fp64, tiles in float64, parallel over row
blocks); CUDA, the Triton kernels of :mod:`equiproj.kernels` (fp16/bf16/fp32); the default
(float64 on CUDA, other devices, or the extension not built): the kernels' pure-torch twin. The
fake implementation and the autograd formula are registered once, here. Energies are float32 for
fp16/bf16/fp32 weights and float64 for float64 weights, with a fixed reduction order (bitwise
reproducible on one device).

Autograd: the energies are differentiable in the weights. The backward runs the op once more with
the incoming gradients as coefficients, ``dW = 2 g_perp (W - P W) + 2 g_G P W``: one pass that
reads W and writes dW. Double backward is not supported (use ``backend="torch"``). When the
coefficients are known up front (a penalty's lambdas), :func:`fused_energies_and_grads` runs the
op once with them: energies and gradients from one read of W and one write of dW (or one
read-modify-write of ``outs``), no autograd graph.

Eager calls go to the device's implementation directly (:func:`device_kernel`), without the
dispatcher's Python layers, which cost many times the kernel on a small layer; ``torch.compile``
and ``opcheck`` see the registered op (one graph node, also with ``fullgraph=True``).

Example::

    >>> import torch, equiproj
    >>> from equiproj._plan import plan_for
    >>> from equiproj.ops import fused_energies
    >>> G = equiproj.SO3(); r = equiproj.Rep.parse(G, "4x0 + 2x1")
    >>> W = torch.randn(10, 10, requires_grad=True)
    >>> (e_perp,), (e_g,) = fused_energies([W], [plan_for(r, r, W.device)])
    >>> e_perp.backward()  # W.grad = 2 (W - P W)
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
           "accumulation_dtype", "energy_dtype", "split_energies", "run_twin", "device_kernel", "prepared_energies",
           "prepared_penalty", "cpu_program", "kernel_coefficient", "remember_plans", "SCHEMA"]

#: the op's schema (the C++ kernel of ``csrc/fused_energies.cpp`` is registered against it)
SCHEMA = ("fused_energies(Tensor[] weights, Tensor[] meta, Tensor[] basis, Tensor[] perm_out, Tensor[] perm_in, "
          "Tensor[] lambda_perp, Tensor[] lambda_G, Tensor(a!)[] grads, bool accumulate) -> (Tensor, Tensor)")

_LIB = torch.library.Library("equiproj", "FRAGMENT")  # kept alive: the registrations live as long as it
_LIB.define(SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
_OP = torch.ops.equiproj.fused_energies.default
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


# ---------------------------------------------------------------------------------------------
# plan objects for the Triton side
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


# ---------------------------------------------------------------------------------------------
# argument checks (the op's contract)
# ---------------------------------------------------------------------------------------------
def _check_op_args(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads) -> None:
    L = len(weights)
    if not (len(meta) == len(basis) == len(perm_out) == len(perm_in) == L):
        raise ValueError(f"fused_energies: got {L} weights but {len(meta)} meta, {len(basis)} basis, "
                         f"{len(perm_out)} perm_out, {len(perm_in)} perm_in tensors")
    if len(lambda_perp) != len(lambda_G) or (lambda_perp and len(lambda_perp) != L):
        raise ValueError("fused_energies: lambda_perp and lambda_G must both be empty or both hold one tensor "
                         "per weight")
    if len(grads) != len(lambda_perp):
        raise ValueError("fused_energies: grads must hold one tensor per weight with lambda_perp and lambda_G, "
                         "and be empty without them")
    for i, (o, W) in enumerate(zip(grads, weights)):
        if o.numel() != W.numel() or o.device != W.device or o.dtype != W.dtype or not o.is_contiguous():
            raise ValueError(f"fused_energies: grads[{i}] must be a contiguous tensor with the {W.numel()} elements "
                             f"of its weight {tuple(W.shape)}, its dtype {W.dtype} and device {W.device}, got "
                             f"{tuple(o.shape)} {o.dtype} on {o.device} (contiguous: {o.is_contiguous()})")


def energy_dtype(weights) -> torch.dtype:
    """The dtype of the op's flat energies: float64 if a weight is float64, else float32."""
    return torch.float64 if any(W.dtype == torch.float64 for W in weights) else torch.float32


def _flat(parts, dtype, device) -> Tensor:
    if not parts:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([e.reshape(-1).to(dtype) for e in parts])


def split_energies(weights, flat: Tensor) -> list[Tensor]:
    """The op's flat energies per weight: ``W_i.shape[:-2]`` in W_i's accumulation dtype."""
    counts = [math.prod(W.shape[:-2]) for W in weights]
    return [e.reshape(W.shape[:-2]).to(accumulation_dtype(W.dtype)) for e, W in zip(flat.split(counts), weights)]


# ---------------------------------------------------------------------------------------------
# the implementations
# ---------------------------------------------------------------------------------------------
def run_twin(weights, plans, lambda_perp, lambda_G):
    """:func:`equiproj.kernels.torch_fused_energies` per weight: ``(e_perp, e_g, grads)`` lists
    (fresh gradients); ``lambda_perp``/``lambda_G`` empty or one tensor per weight with one
    coefficient per matrix."""
    from ..kernels.torch_twin import torch_fused_energies  # noqa: PLC0415 - equiproj.kernels imports _plan only

    with autocast_off(weights[0].device if weights else "cpu"):  # the twin's dtypes; stacking mixed half dtypes
        flat_w, flat_p, flat_cp, flat_cg, counts = _flatten_batches(weights, plans, lambda_perp, lambda_G)
        ep, eg, gr = torch_fused_energies(flat_w, flat_p, flat_cp, flat_cg)
        return _unflatten(weights, counts, ep, eg, gr)


def _write(grads, fresh, accumulate: bool) -> None:
    with torch.no_grad():
        for o, g in zip(grads, fresh):
            target = o.view(g.shape)
            target.add_(g.to(o.dtype)) if accumulate else target.copy_(g)


def _twin_kernel(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate):
    """The op through the pure-torch twin (gradients computed fresh, then written or added)."""
    _check_op_args(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads)
    ep, eg, gr = run_twin(weights, _plans_from_tensors(weights, meta, basis, perm_out, perm_in), lambda_perp, lambda_G)
    _write(grads, gr, accumulate)
    dt, dev = energy_dtype(weights), (weights[0].device if weights else "cpu")
    return _flat(ep, dt, dev), _flat(eg, dt, dev)


def _default_kernel(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate):
    """Any device without its own kernel. On CPU this runs only before the extension is loaded:
    loading it registers its kernel for the op, which the call then takes."""
    if weights and weights[0].device.type == "cpu" and cpp_available() and _cpp_registered():
        return _OP.redispatch(_CPU_KEYS, weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads,
                              accumulate)
    return _twin_kernel(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate)


@functools.cache
def _cpp_registered() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("equiproj::fused_energies", "CPU")


def _cpu_kernel(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate):
    """The CPU implementation: the C++ kernel registered for the op (it checks its arguments), or
    the twin where the extension is not available."""
    if not cpp_available() or not _cpp_registered():
        return _twin_kernel(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate)
    if torch._C._len_torch_dispatch_stack():  # a dispatch mode (a profiler, a counter) sees the op
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return _OP(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate)
    return _OP.redispatch(_CPU_KEYS, weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate)


def _cuda_kernel(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate):
    """The CUDA implementation: the Triton kernels (fp16/bf16/fp32), else the twin."""
    _check_op_args(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads)
    k = triton_kernels()
    if k is None or not k.HAS_TRITON or any(W.dtype == torch.float64 for W in weights):
        return _twin_kernel(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate)
    plans = _plans_from_tensors(weights, meta, basis, perm_out, perm_in)
    if not all(_triton_supports(k, P) for P in plans):  # fields wider than the kernel's largest tile
        return _twin_kernel(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate)
    dt, dev = energy_dtype(weights), weights[0].device
    with autocast_off("cuda"):  # an autocast region of the caller would refuse to stack mixed half dtypes
        flat_w, flat_p, cp, cg, counts = _flatten_batches(weights, plans, lambda_perp, lambda_G)
        if not grads or not accumulate:
            ep, eg, gr = k.fused_energies(flat_w, flat_p, cp, cg)
            ep, eg, gr = _unflatten(weights, counts, ep, eg, gr)
            _write(grads, gr, False)
            return _flat(ep, dt, dev), _flat(eg, dt, dev)
        flat_o = []  # the same per-matrix views as _flatten_batches makes of the weights
        for o, W in zip(grads, weights):
            flat_o += [o.view(W.shape)] if W.dim() == 2 else list(o.view((-1,) + W.shape[-2:]).unbind(0))
        ep, eg, _ = k.fused_energies(flat_w, flat_p, cp, cg, outs=flat_o)
        ep, eg, _ = _unflatten(weights, counts, ep, eg, None)
        return _flat(ep, dt, dev), _flat(eg, dt, dev)


def device_kernel(device: torch.device):
    """The op's implementation for ``device`` (what the dispatcher runs below autograd), a function
    of the op's arguments: eager callers that have checked their arguments call it directly."""
    if device.type == "cpu":
        return _cpu_kernel
    if device.type == "cuda":
        return _cuda_kernel
    return _twin_kernel


def _flatten_batches(weights, plans, lambda_perp, lambda_G):
    """Per-matrix coefficients in the ``[L]`` contract of equiproj.kernels: a batched weight with
    gradients becomes one entry per matrix (views), each with its own coefficient."""
    want_grad = bool(lambda_perp)
    if not want_grad:
        return list(weights), list(plans), None, None, None
    flat_w, flat_p, cps, cgs, counts = [], [], [], [], []
    for W, P, cp, cg in zip(weights, plans, lambda_perp, lambda_G):
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
    cdt = energy_dtype(weights)
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


def _fake_kernel(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate):
    _check_op_args(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads)
    total = sum(math.prod(W.shape[:-2]) for W in weights)
    like = weights[0] if weights else torch.empty(0)
    dt = energy_dtype(weights)
    return like.new_empty((total,), dtype=dt), like.new_empty((total,), dtype=dt)


# ---------------------------------------------------------------------------------------------
# autograd (registered once; the eager entry point uses the same Function)
# ---------------------------------------------------------------------------------------------
_NO_DOUBLE_BACKWARD = ("equiproj::fused_energies does not support double backward (create_graph=True); "
                       "use backend='torch' for higher derivatives")


class _FusedEnergies(torch.autograd.Function):
    """The flat energies of ``weights`` (differentiable in them); the backward is
    ``backward_kernel`` with the incoming gradients as coefficients, written into fresh buffers.
    ``forward_kernel`` and ``backward_kernel`` have the op's signature: the device implementation
    for eager calls, the redispatch below autograd and the op itself for the registered kernel."""

    @staticmethod
    def forward(ctx, forward_kernel, backward_kernel, plan, *weights):
        # plan: (meta, basis, perm_out, perm_in), constants of the layers, passed as they are (not
        # saved copies, not autograd inputs)
        ctx.backward_kernel, ctx.plan = backward_kernel, plan
        ctx.save_for_backward(*weights)
        return forward_kernel(list(weights), *plan, [], [], [], False)

    @staticmethod
    def backward(ctx, grad_e_perp, grad_e_g):
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        weights, (meta, basis, perm_out, perm_in) = list(ctx.saved_tensors), ctx.plan

        counts = [math.prod(W.shape[:-2]) for W in weights]

        def coefficients(g):  # one per matrix, flat (the kernels read them so); an unused output arrives as None
            if g is None:
                g = weights[0].new_zeros(sum(counts), dtype=energy_dtype(weights))
            return list(g.split(counts))

        dW = [torch.empty(W.shape, dtype=W.dtype, device=W.device) for W in weights]
        ctx.backward_kernel(weights, meta, basis, perm_out, perm_in, coefficients(grad_e_perp),
                            coefficients(grad_e_g), dW, False)
        return (None, None, None, *dW)


def _autograd_kernel(keyset, weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate):
    below = keyset & torch._C._after_autograd_keyset

    def redispatch(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return _OP.redispatch(below, *args)

    if torch.is_grad_enabled() and any(W.requires_grad for W in weights):
        if grads:
            raise RuntimeError("equiproj::fused_energies with gradient outputs is not differentiable: call it under "
                               "torch.no_grad() or with weights that do not require grad")
        return _FusedEnergies.apply(redispatch, _OP, (meta, basis, perm_out, perm_in), *weights)
    return redispatch(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate)


def _inplace_or_view_kernel(keyset, weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads,
                            accumulate):
    below = keyset & torch._C._after_ADInplaceOrView_keyset
    with torch._C._AutoDispatchBelowADInplaceOrView():
        result = _OP.redispatch(below, weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads,
                                accumulate)
    if grads:
        torch.autograd.graph.increment_version(list(grads))
    return result


_LIB.impl("fused_energies", _default_kernel, "CompositeExplicitAutograd")
_LIB.impl("fused_energies", _cuda_kernel, "CUDA")
_LIB.impl("fused_energies", _autograd_kernel, "Autograd", with_keyset=True)
_LIB.impl("fused_energies", _inplace_or_view_kernel, "ADInplaceOrView", with_keyset=True)
torch.library.register_fake("equiproj::fused_energies", _fake_kernel, lib=_LIB)


# ---------------------------------------------------------------------------------------------
# the entry points
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


def _plan_tensors(plans):
    return ([P.meta for P in plans], [P.basis for P in plans], [P.perm_out for P in plans],
            [P.perm_in for P in plans])


def fused_energies(weights, plans) -> tuple[list[Tensor], list[Tensor]]:
    """``(E_perp, E_G)`` of many weights through ``equiproj::fused_energies``, differentiable.

    Args:
        weights: L tensors, the i-th ``[..., m_i, n_i]`` (any strides), all on one device.
        plans: L :class:`~equiproj._plan.PackedPlan` (from :func:`packed_plan`), the i-th for W_i.
    Returns:
        two lists of L tensors ``[...]`` (float32, or float64 for float64 weights). The op is
        called once for all layers (a constant number of kernel launches).
    """
    weights, plans = list(weights), list(plans)
    dev = _check_weights(weights, plans)
    if not weights:
        return [], []
    if torch.compiler.is_compiling():  # the registered op: one graph node with fake impl and autograd
        ep, eg = _OP(weights, *_plan_tensors(plans), [], [], [], False)
    else:
        _remember(plans)
        kernel = device_kernel(dev)
        ep, eg = _FusedEnergies.apply(kernel, kernel, _plan_tensors(plans), *weights)
    return split_energies(weights, ep), split_energies(weights, eg)


def prepared_energies(kernel, plan_tensors, weights) -> tuple[Tensor, Tensor]:
    """The flat energies ``(E_perp, E_G)`` of ``weights`` (one per matrix), differentiable, for a
    caller that prepared everything once: ``kernel`` from :func:`device_kernel`, ``plan_tensors``
    the lists ``(meta, basis, perm_out, perm_in)`` of plans passed to :func:`remember_plans`."""
    return _FusedEnergies.apply(kernel, kernel, plan_tensors, *weights)


class _PenaltyValue(torch.autograd.Function):
    """``sum_i lambda_perp_i E_perp_i + lambda_G_i E_G_i`` of prepared weights, a differentiable
    scalar whose gradient comes from the forward's pass.

    The coefficients are known when the value is computed, so the forward runs the op once with
    them: the energies and ``dvalue/dW_i`` from one read of each ``W_i``, written into fresh
    buffers of the parameters' shapes. The backward hands these buffers over, scaled in place by the
    incoming gradient where that is not 1: no second pass over the weights. A second backward
    through a retained graph (the buffers are given away by the first) runs the op again."""

    @staticmethod
    def forward(ctx, prepared, *params):
        # prepared: the constants in one argument (Function.apply looks at every argument);
        # params: the autograd inputs, whose shapes the gradients take
        run, dtype = prepared
        value, grads = run()
        ctx.run, ctx.grads = run, grads
        ctx.save_for_backward(*params)  # only a second backward reads them (and checks they are unchanged)
        # and their version counters, which saved-tensor hooks that copy what is saved do not hide
        ctx.params, ctx.versions = params, [p._version for p in params]
        return torch.scalar_tensor(value, dtype=dtype) if isinstance(value, float) else value.to(dtype)

    @staticmethod
    def backward(ctx, grad_value):
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        grads, ctx.grads = ctx.grads, None  # the first backward needs no weight: the gradient is computed
        if grads is None:  # a second backward through a retained graph: the pass again, on the weights as they are
            ctx.saved_tensors  # noqa: B018 - raises if the graph was freed
            if [p._version for p in ctx.params] != ctx.versions:
                raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                                   "inplace operation: a weight of the penalty changed since penalty() was called; "
                                   "call penalty() again")
            grads = ctx.run()[1]
        # the usual incoming gradient is 1 (value.backward()); reading it is free for a plain CPU tensor
        if type(grad_value) is not torch.Tensor or (not torch.compiler.is_compiling()  # (compiled autograd: no vmap)
                                                    and torch._C._functorch.is_legacy_batchedtensor(grad_value)):
            return (None, *(g * grad_value for g in grads))  # a subclass, or batched (is_grads_batched)
        if grad_value.device.type != "cpu" or float(grad_value) != 1.0:
            for g in grads:
                g.mul_(grad_value)
        return (None, *grads)


def prepared_penalty(run, dtype, params) -> Tensor:
    """``sum_i lambda_perp_i E_perp_i + lambda_G_i E_G_i`` (a scalar of ``dtype``), differentiable in
    ``params``, from one op call that also writes the gradient (no second pass in the backward).

    ``run()``: the op on the matrix views of ``params`` with the lambdas as coefficients, writing
    the gradients into fresh contiguous tensors shaped like ``params``: ``(value, grads)``, the
    value in float64 (a Python float, or a 0-dim tensor on the weights' device). A second backward
    through a retained graph calls it again: its coefficients are the forward's."""
    return _PenaltyValue.apply((run, dtype), *params)


def cpu_program(weights, params, plan_tensors):
    """The C++ extension's prepared program (``torch.classes.equiproj_cpu.Prepared``) for these 2-D
    CPU ``weights`` (detached matrix views of ``params``) and their plans' tensors ``(meta, basis,
    perm_out, perm_in)``, or ``None`` where the extension is not available or a weight is not a 2-D
    CPU tensor. Its runs are the op's CPU kernel on these weights, with the same results, and take
    no tensor lists per call: ``energies()`` (the op's flat energies), and, after
    ``set_lambdas(lambda_perp, lambda_G)``, ``value()`` (the weighted sum of the energies, a float),
    ``backward()`` (``(ok, value)``: the gradient into the parameters' ``.grad``), ``fresh()``
    (``(value, grads)``: into new tensors), ``penalty(wide)`` (the value as a 0-dim float32 tensor,
    float64 if ``wide``, whose C++ autograd node hands over the gradient ``fresh`` wrote) and
    ``step(c_perp, c_G)`` (the weights in place)."""
    if not weights or not (cpp_available() and _cpp_registered()):
        return None
    if any(W.dim() != 2 or W.device.type != "cpu" for W in weights):
        return None
    return torch.classes.equiproj_cpu.Prepared(list(weights), list(params), *(list(x) for x in plan_tensors))


def remember_plans(plans) -> None:
    """Keep the plan objects of these plans' tensors (the CUDA kernel caches its schedules per plan)."""
    _remember(plans)


def fused_energies_and_grads(weights, plans, lambda_perp, lambda_G, outs=None
                             ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``(E_perp, E_G, grads)`` of many weights from one kernel call, without an autograd graph:
    ``grads[i] = 2 lambda_perp_i (W_i - P W_i) + 2 lambda_G_i P W_i``, the gradient of
    ``sum_i lambda_perp_i E_perp_i + lambda_G_i E_G_i``.

    Each weight is read once and its gradient written once. The differentiable
    :func:`fused_energies` reads each weight twice (forward, then backward): its forward cannot
    know the incoming gradient, and writing ``W - P W`` there would cost a scaling pass later.

    Args:
        weights, plans: as in :func:`fused_energies` (weights are not differentiated through).
        lambda_perp, lambda_G: L coefficients, each a number or a tensor broadcastable to ``W_i.shape[:-2]``.
        outs: ``None``, or L tensors (``W_i``'s shape) to which the gradients are added in place
            instead of being returned in fresh buffers: e.g. existing ``.grad`` tensors, or the
            weights themselves for a decoupled step ``W <- W - rate (W - P W)``
            (``lambda_perp = -rate / 2``). Contiguous outputs of the weight's dtype take the op's
            one pass; others get a fresh gradient added.
    Returns:
        two lists of L energies ``[...]`` (float32, or float64 for float64 weights) and L gradients
        (``W_i``'s shape and dtype, contiguous; with ``outs``: ``outs`` itself).
    """
    weights, plans = list(weights), list(plans)
    dev = _check_weights(weights, plans)
    lambda_perp, lambda_G = list(lambda_perp), list(lambda_G)
    if len(lambda_perp) != len(weights) or len(lambda_G) != len(weights):
        raise ValueError(f"need one lambda_perp and one lambda_G per weight: got {len(weights)} weights, "
                         f"{len(lambda_perp)} lambda_perp, {len(lambda_G)} lambda_G")
    if not weights:
        return [], [], []
    weights = [W.detach() for W in weights]
    cps = [as_coefficient(c, W, f"lambda_perp[{i}]") for i, (c, W) in enumerate(zip(lambda_perp, weights))]
    cgs = [as_coefficient(c, W, f"lambda_G[{i}]") for i, (c, W) in enumerate(zip(lambda_G, weights))]
    compiling = torch.compiler.is_compiling()
    if not compiling:
        _remember(plans)
    call = _OP if compiling else device_kernel(dev)
    with torch.no_grad():
        if outs is None:
            grads = [torch.empty(W.shape, dtype=W.dtype, device=W.device) for W in weights]
            ep, eg = call(weights, *_plan_tensors(plans), cps, cgs, grads, False)
            return split_energies(weights, ep), split_energies(weights, eg), grads
        outs = list(outs)
        if len(outs) != len(weights):
            raise ValueError(f"need one output per weight: got {len(weights)} weights and {len(outs)} outs")
        for i, (o, W) in enumerate(zip(outs, weights)):
            if not isinstance(o, Tensor) or o.shape != W.shape or o.device != W.device:
                raise ValueError(f"outs[{i}] must have the shape {tuple(W.shape)} and device of its weight, got "
                                 f"{tuple(getattr(o, 'shape', ()))} on {getattr(o, 'device', None)}")
        if all(o.is_contiguous() and o.dtype == W.dtype for o, W in zip(outs, weights)):
            ep, eg = call(weights, *_plan_tensors(plans), cps, cgs, outs, True)
        else:  # outputs the kernels cannot write into: a fresh gradient, added
            grads = [torch.empty(W.shape, dtype=W.dtype, device=W.device) for W in weights]
            ep, eg = call(weights, *_plan_tensors(plans), cps, cgs, grads, False)
            for o, g in zip(outs, grads):
                o.add_(g.to(o.dtype))
        return split_energies(weights, ep), split_energies(weights, eg), outs


def fused_energies_and_grad(W: Tensor, plan: PackedPlan, lambda_perp: Tensor, lambda_G: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fused_energies_and_grads` of one weight whose arguments the caller has checked
    (``W`` matches ``plan``; ``lambda_perp``, ``lambda_G`` from :func:`as_coefficient`): the per-call
    cost of a small layer is mostly Python, so the list plumbing is skipped."""
    if torch.compiler.is_compiling():
        (ep,), (eg,), (gr,) = fused_energies_and_grads([W], [plan], [lambda_perp], [lambda_G])
        return ep, eg, gr
    _remember((plan,))
    W = W.detach()
    grad = torch.empty(W.shape, dtype=W.dtype, device=W.device)
    ep, eg = device_kernel(W.device)([W], [plan.meta], [plan.basis], [plan.perm_out], [plan.perm_in], [lambda_perp],
                                     [lambda_G], [grad], False)
    batch = W.shape[:-2]
    return ep.reshape(batch), eg.reshape(batch), grad


# bounded by entries, not bytes: each value is a 0-dim tensor
@functools.lru_cache(maxsize=256)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def kernel_coefficient(c, W: Tensor, name: str) -> Tensor:
    """:func:`as_coefficient`, in the dtype the device's implementation reads as it is: float64 on
    the CPU (the C++ kernel computes in float64 and would convert any other coefficient on every
    call, about a microsecond each), the accumulation dtype elsewhere."""
    t = as_coefficient(c, W, name)
    if W.device.type != "cpu" or t.dtype == torch.float64:
        return t
    if W.dim() == 2 and not isinstance(c, Tensor):
        return _scalar(float(c), torch.float64, W.device)
    return t.to(torch.float64)


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
