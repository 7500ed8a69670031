"""Argument checks shared by :func:`fused_energies` and :func:`torch_fused_energies`, and the
numeric context of both (accumulation dtype, autocast off)."""

from __future__ import annotations

import contextlib

import torch

from equiproj._plan import PackedPlan, PlanColumn

__all__ = ["check_inputs", "KERNEL_DTYPES", "accumulation_dtype", "autocast_off"]

#: weight dtypes the Triton kernel handles (energies accumulate in float32 for all of them)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype energies are computed and returned in, for weights of ``dtype``: float64 for float64,
    float32 for everything else (half precision and float32 alike)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_off(device) -> contextlib.AbstractContextManager:
    """A context in which ``torch.autocast`` is disabled for ``device``'s type.

    The energies are computed in :func:`accumulation_dtype` whatever region the caller is in: under
    autocast the einsums and matrix products of the projection would run in bfloat16/float16
    (relative errors ~1e-3 instead of ~1e-7), and promoting ops (``stack``, ``cat``) refuse to mix
    float16 and bfloat16 tensors. The result is the same as without autocast."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if torch.amp.is_autocast_available(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def check_inputs(weights, plans, lambda_perp, lambda_G, *, allow_float64: bool):
    """Validate ``(weights, plans, lambda_perp, lambda_G)``; returns them as lists / tensors.

    Raises ``TypeError`` / ``ValueError`` naming the offending layer and argument.
    """
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors, got {type(weights).__name__}")
    if isinstance(plans, PackedPlan) or not isinstance(plans, (list, tuple)):
        raise TypeError(f"plans must be a list of PackedPlan, got {type(plans).__name__}")
    weights, plans = list(weights), list(plans)
    if len(weights) != len(plans):
        raise ValueError(f"got {len(weights)} weights but {len(plans)} plans")
    allowed = KERNEL_DTYPES + ((torch.float64,) if allow_float64 else ())
    for i, (W, P) in enumerate(zip(weights, plans)):
        if not isinstance(W, torch.Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(W).__name__}")
        if not isinstance(P, PackedPlan):
            raise TypeError(f"plans[{i}] must be a PackedPlan, got {type(P).__name__}")
        if W.dtype == torch.float64 and not allow_float64:
            raise ValueError(f"weights[{i}] is float64: the Triton kernel accumulates in float32 and does not take "
                             "float64 weights; use torch_fused_energies or the reference path for them")
        if W.dtype not in allowed:
            raise TypeError(f"weights[{i}] has dtype {W.dtype}; expected one of {[str(d) for d in allowed]}")
        if W.dim() < 2 or tuple(W.shape[-2:]) != (P.m, P.n):
            raise ValueError(f"weights[{i}] must have shape [..., {P.m}, {P.n}] to match plans[{i}], "
                             f"got {tuple(W.shape)}")
        if P.meta.dim() != 2 or P.meta.shape[1] != len(PlanColumn):
            raise ValueError(f"plans[{i}].meta must have shape [P, {len(PlanColumn)}], got {tuple(P.meta.shape)}")
        if P.basis.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"plans[{i}].basis is {P.basis.dtype}; a half-precision basis loses the projection's "
                             "accuracy: use equiproj._plan.plan_for(rep_in, rep_out, device)")
    if (lambda_perp is None) != (lambda_G is None):
        raise ValueError("give both lambda_perp and lambda_G (to get gradients) or neither")
    if lambda_perp is not None:
        for name, c in (("lambda_perp", lambda_perp), ("lambda_G", lambda_G)):
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"{name} must be a tensor of shape [{len(weights)}], got {type(c).__name__}")
            if not c.is_floating_point() or tuple(c.shape) != (len(weights),):
                raise ValueError(f"{name} must be a floating-point tensor of shape [{len(weights)}], "
                                 f"got {c.dtype} {tuple(c.shape)}")
    return weights, plans, lambda_perp, lambda_G
