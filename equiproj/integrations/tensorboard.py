"""Per-layer energies to TensorBoard (optional: ``pip install tensorboard`` for ``SummaryWriter``).

Example (a sketch: ``model`` has declared layers, ``step`` is the training step)::

    from torch.utils.tensorboard import SummaryWriter
    from equiproj.integrations.tensorboard import log_energies

    writer = SummaryWriter("runs/equiproj")
    log_energies(writer, model, step)          # or equiproj.nn.report(model).log_to(writer, step)
"""

from __future__ import annotations

from torch import nn

from ..nn import Report, report

__all__ = ["log_energies"]


def log_energies(writer, model: nn.Module, step: int, prefix: str = "equiproj", layers=None) -> Report:
    """Write every declared layer's ``E_perp/||W||^2`` (and ``E_perp``, ``E_G``) of ``model`` as scalars at
    ``step`` (:meth:`equiproj.nn.Report.log_to`) and return the report. ``writer``: anything with
    ``add_scalar(tag, value, step)``, e.g. ``torch.utils.tensorboard.SummaryWriter``."""
    rep = report(model, layers=layers)
    rep.log_to(writer, step, prefix)
    return rep
