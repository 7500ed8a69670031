"""A PyTorch Lightning callback for approximate equivariance (optional: ``pip install lightning``).

``EquivarianceCallback`` finds the declared layers of the ``LightningModule`` (``equiproj.nn.declare``)
and, every training step, either adds the penalty's gradient after the task's backward
(``mode="penalty"``: ``ProjectionPenalty.backward``, no change to ``training_step``) or takes the
decoupled step after the optimiser's (``mode="decoupled"``: ``ProjectionPenalty.decay_``), with a λ
that may follow a schedule of the global step (``equiproj.nn.linear_warmup``, ``cosine``, ...). Every
``log_every_n_steps`` it logs each layer's ``E_perp/||W||^2`` through ``LightningModule.log_dict``
(so to whatever logger the trainer has: TensorBoard, CSV, ...).

Example (a sketch: ``module`` is your ``LightningModule`` with declared layers, ``data`` its loader)::

    import lightning as L
    import equiproj
    from equiproj.integrations.lightning import EquivarianceCallback

    callback = EquivarianceCallback(lambda_perp=equiproj.nn.linear_warmup(1e-2, steps=1000))
    L.Trainer(callbacks=[callback]).fit(module, data)
"""

from __future__ import annotations

import numbers

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("equiproj.integrations.lightning needs PyTorch Lightning: pip install lightning") from e

from ..nn import ProjectionPenalty, report

__all__ = ["EquivarianceCallback"]

_MODES = ("penalty", "decoupled")


def _as_schedule(value, name: str):
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 or a schedule step -> value (equiproj.nn.cosine, ...), got "
                         f"{value!r}")
    return lambda step: float(value)


class EquivarianceCallback(Callback):
    """The projection penalty (or the decoupled step) and per-layer energy logging in a Lightning loop.

    Args:
        lambda_perp: weight of ``E_perp`` (``mode="penalty"``) or the decoupled rate in ``[0, 1]``
            (``mode="decoupled"``): a number or a schedule ``global_step -> value``.
        lambda_G: the same for ``E_G`` (default 0).
        mode: ``"penalty"`` (gradient added to ``.grad`` after the task's backward, before the optimiser
            step) or ``"decoupled"`` (``W <- W - rate (W - P W)`` after the optimiser step).
        log_every_n_steps: log ``equiproj/rel_perp/<layer>`` (and the total) every so many steps; 0 never.
        layers: restrict to these declared layers (names or modules), as ``ProjectionPenalty``.

    With gradient accumulation the penalty's gradient is added once per optimiser step (at the
    backward of the last micro-batch). The penalty follows the module (layers declared later are found).
    """

    def __init__(self, lambda_perp, lambda_G=0.0, *, mode: str = "penalty", log_every_n_steps: int = 50,
                 layers=None):
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be 'penalty' or 'decoupled', got {mode!r}")
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps must be an int >= 0, got {log_every_n_steps!r}")
        self.lambda_perp, self.lambda_G = _as_schedule(lambda_perp, "lambda_perp"), _as_schedule(lambda_G, "lambda_G")
        self.mode, self.log_every_n_steps, self.layers = mode, log_every_n_steps, layers
        self.penalty: ProjectionPenalty | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.penalty = ProjectionPenalty(pl_module, lambda_perp=0.0, layers=self.layers)

    def _lambdas(self, trainer) -> tuple[float, float]:
        step = trainer.global_step
        return float(self.lambda_perp(step)), float(self.lambda_G(step))

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.mode != "penalty" or not self._last_micro_batch(trainer):
            return
        lp, lg = self._lambdas(trainer)
        if lp or lg:
            self.penalty.set_lambdas(lambda_perp=lp, lambda_G=lg)
            self.penalty.backward()

    @staticmethod
    def _last_micro_batch(trainer) -> bool:
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        acc = max(1, int(getattr(trainer, "accumulate_grad_batches", 1)))
        if acc == 1 or loop is None:
            return True
        return (loop.batch_progress.current.ready % acc) == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.mode == "decoupled" and self._last_micro_batch(trainer):
            lp, lg = self._lambdas(trainer)
            if lp or lg:
                self.penalty.decay_(lp, lg)
        n = self.log_every_n_steps
        if n and trainer.global_step % n == 0:
            pl_module.log_dict(report(pl_module, layers=self.layers).scalars(), on_step=True, on_epoch=False)
