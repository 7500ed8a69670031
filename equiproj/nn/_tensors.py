"""Parameters as the penalty sees them: FSDP2 (DTensor) shards gathered and scattered, gradients added."""

from __future__ import annotations

import contextlib
import functools

import torch


def _dtensor_cls():
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


_DTENSOR = _dtensor_cls()


def is_dtensor(t) -> bool:
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP2) is all-gathered (differentiable), anything else returned as is."""
    return t.full_tensor() if is_dtensor(t) else t


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)``; ``value`` is the full tensor (scattered back into a DTensor's shards)."""
    if is_dtensor(param):
        try:
            from torch.distributed.tensor import distribute_tensor
        except ImportError:  # torch < 2.5
            from torch.distributed._tensor import distribute_tensor
        param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))
    else:
        param.copy_(value.reshape(param.shape).to(param.dtype))


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad += grad`` as autograd would (a fresh ``.grad`` when there is none)."""
    if not param.requires_grad:
        return
    grad = grad.reshape(param.shape).to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def no_autocast(device: torch.device):
    """Energies keep their precision under AMP: autocast off for the device (where it has autocast)."""
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()  # nothing to turn off (entering an autocast region costs more)
    return torch.autocast(device_type=device.type, enabled=False)


def opaque_to_compile(fn):
    """``fn`` as one eager call inside ``torch.compile``d code (a graph break, as ``torch.compiler.disable``
    gives), and ``fn`` itself outside: eager callers skip the disabling wrapper and its frame switches,
    0.2-0.4 % of the bench MLP's training step (measured interleaved, for ``penalty()``)."""
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call
