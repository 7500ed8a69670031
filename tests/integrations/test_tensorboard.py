"""Per-layer energies written to TensorBoard event files and read back (needs ``tensorboard``)."""

import pytest
import torch

import equiproj

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from equiproj.integrations.tensorboard import log_energies  # noqa: E402


def test_report_log_to_writes_every_layer(tmp_path, gen):
    G = equiproj.Dihedral(4)
    model = torch.nn.Sequential(equiproj.nn.declare(torch.nn.Linear(8, 8), G.regular(), G.regular()), torch.nn.ReLU(),
                                equiproj.nn.declare(torch.nn.Linear(8, 1), G.regular(), G.trivial()))
    writer = SummaryWriter(str(tmp_path))
    rep = log_energies(writer, model, step=3)
    equiproj.nn.report(model).log_to(writer, 4)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"equiproj/rel_perp/0", "equiproj/rel_perp/2", "equiproj/rel_perp/total", "equiproj/e_perp/0"} <= tags
    for row in rep.rows:
        logged = events.Scalars(f"equiproj/rel_perp/{row['name']}")
        assert [e.step for e in logged] == [3, 4]
        assert logged[0].value == pytest.approx(row["rel_perp"], rel=1e-6)
    with pytest.raises(TypeError, match="add_scalar"):
        rep.log_to(object(), 0)
