"""The Lightning callback: the penalty's gradient added after the task's backward, or the decoupled step
after the optimiser's, with a schedule, and per-layer energies logged (needs ``lightning``; skipped
without it)."""

import pytest
import torch

import equiproj

L = pytest.importorskip("lightning")
from equiproj.integrations.lightning import EquivarianceCallback  # noqa: E402


class _Module(L.LightningModule):
    """One declared Linear under C4 and no task gradient: every change of the weight is the callback's."""

    def __init__(self, gen, lr):
        super().__init__()
        G = equiproj.Cyclic(4)
        self.lin = equiproj.nn.declare(torch.nn.Linear(4, 4, bias=False), G.regular(), G.regular())
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(4, 4, generator=gen))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return 0.0 * self.lin(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit(module, callback, steps, tmp_path, gen):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(steps * 2, 4, generator=gen)),
                                       batch_size=2)
    trainer = L.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    return trainer


def _e_perp(module):
    G = equiproj.Cyclic(4)
    W = module.lin.weight.detach().double()
    return float(equiproj.reference.energies(W, G.regular(), G.regular())[0])


def test_penalty_mode_takes_gradient_steps_with_the_schedule(tmp_path, gen):
    lr, lam = 0.1, 0.5
    module = _Module(gen, lr)
    before = _e_perp(module)
    # with no task gradient, SGD on lam * E_perp scales W - PW by (1 - 2 lr lam) per step (E_perp by its square)
    schedule = lambda step: lam if step > 0 else 0.0  # noqa: E731 - the first step has lambda 0
    trainer = _fit(module, EquivarianceCallback(schedule, log_every_n_steps=1), 3, tmp_path, gen)
    assert _e_perp(module) == pytest.approx(before * (1 - 2 * lr * lam) ** 4, rel=1e-5)
    assert "equiproj/rel_perp/lin" in trainer.callback_metrics
    assert float(trainer.callback_metrics["equiproj/rel_perp/lin"]) == pytest.approx(
        _e_perp(module) / float(module.lin.weight.detach().double().square().sum()), rel=1e-4)


def test_decoupled_mode_shrinks_the_non_equivariant_part(tmp_path, gen):
    module = _Module(gen, lr=0.0)
    before = _e_perp(module)
    _fit(module, EquivarianceCallback(0.25, mode="decoupled", log_every_n_steps=0), 2, tmp_path, gen)
    assert _e_perp(module) == pytest.approx(before * 0.75 ** 4, rel=1e-5)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="mode"):
        EquivarianceCallback(1.0, mode="both")
    with pytest.raises(ValueError, match="lambda_perp"):
        EquivarianceCallback(-1.0)
