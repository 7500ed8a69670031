"""Training-loop integrations (optional dependencies, imported only from their own modules):

* :mod:`equiproj.integrations.lightning` — ``EquivarianceCallback``, the penalty or the decoupled step with a
  λ schedule and per-layer ``E_perp/||W||^2`` logged, for PyTorch Lightning (``pip install lightning``);
* :mod:`equiproj.integrations.tensorboard` — ``log_energies``, per-layer energies to a TensorBoard
  ``SummaryWriter`` (``pip install tensorboard``; the same as ``equiproj.nn.report(model).log_to(writer, step)``).

``import equiproj`` never imports this package.
"""
