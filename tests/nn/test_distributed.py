"""ProjectionPenalty / project_ / report under DDP and FSDP2 (fully_shard, DTensor parameters).

One spawn of 2 CPU processes (gloo) runs both wrappers (process start-up dominates the cost);
each rank trains on its half of the batch. Expected: the penalty equals the single-process
value, and the gradients (data loss averaged over ranks + penalty) equal the single-process
gradients of (data loss on the whole batch + penalty). float64 throughout; tolerance 1e-10
relative on the penalty, 1e-9 on gradients (the all-reduce / reduce-scatter sums in another order).
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import equiproj as ep
from equiproj.nn import ProjectionPenalty, declare, project_, report

WORLD = 2
LAMBDA_PERP, LAMBDA_G = 0.3, {"default": 0.0, "2": 0.05}
RATE = 0.4  # the decoupled step taken after the penalty's step


def build():
    torch.manual_seed(0)
    G = ep.Dihedral(4)
    reg = G.regular()
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()
    declare(model[0], G.trivial(), reg)
    declare(model[2], reg, reg)
    declare(model[5], reg, ep.Rep.parse(G, "(0,0) + (1,1)"))
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4 * WORLD, 1, 6, 6, dtype=torch.float64, generator=g)


def step(model, penalty, x):
    value = penalty()
    loss = model(x).square().mean() + value
    loss.backward()
    return value.detach()


def single_process():
    model = build()
    pen = ProjectionPenalty(model, LAMBDA_PERP, LAMBDA_G)
    value = step(model, pen, data())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    pen.decay_(RATE)
    decayed = {n: p.detach().clone() for n, p in model.named_parameters()}
    project_(model)
    return value, grads, {n: p.detach().clone() for n, p in model.named_parameters()}, decayed


def _worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x = data().chunk(WORLD)[rank]
        res = {}
        # DDP
        model = build()
        ddp = nn.parallel.DistributedDataParallel(model)
        pen = ProjectionPenalty(ddp, LAMBDA_PERP, LAMBDA_G)
        res["ddp_value"] = step(ddp, pen, x)
        res["ddp_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        pen.decay_(RATE)  # every rank steps its replica alike
        res["ddp_decayed"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        # FSDP2: every declared layer and the root sharded; parameters become DTensors
        from torch.distributed.fsdp import fully_shard

        model = build()
        for i in (0, 2, 5):
            fully_shard(model[i])
        fully_shard(model)
        pen = ProjectionPenalty(model, LAMBDA_PERP, LAMBDA_G)
        res["fsdp_is_dtensor"] = type(model[2].weight).__name__
        res["fsdp_value"] = step(model, pen, x)
        res["fsdp_grads"] = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
        pen.decay_(RATE)  # gathers, steps, scatters back into the shards
        res["fsdp_decayed"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        project_(model)  # gathers, projects, scatters back into the shards
        res["fsdp_projected"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        res["fsdp_report_e_perp"] = [r["e_perp"] for r in report(model).rows]
        res["fsdp_report_module"] = report(model).rows[0]["module"]
        if rank == 0:
            torch.save(res, out_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("dist") / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


def _close(a, b, tol):
    assert float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-300)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_penalty_and_gradients_equal_single_process(distributed_results, wrapper):
    value, grads, _, decayed = single_process()
    res = distributed_results
    _close(res[f"{wrapper}_value"], value, 1e-10)
    assert res[f"{wrapper}_grads"].keys() == grads.keys()
    for n, g in grads.items():
        _close(res[f"{wrapper}_grads"][n], g, 1e-9)
    for n, p in decayed.items():  # the decoupled step on replicas and on shards
        _close(res[f"{wrapper}_decayed"][n], p, 1e-9)


def test_fsdp_project_and_report(distributed_results):
    res = distributed_results
    assert res["fsdp_is_dtensor"] == "DTensor"
    _, _, projected, _ = single_process()
    for n, p in projected.items():
        _close(res["fsdp_projected"][n], p, 1e-12)
    assert max(res["fsdp_report_e_perp"]) < 1e-26
    assert res["fsdp_report_module"] == "Conv2d"
