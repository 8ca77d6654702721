"""Flat-LoRA under DistributedDataParallel: 2 CPU processes on gloo.

Checks, with DDP's default options (``broadcast_buffers=True``): gradients are the average of the
ranks' local gradients; each rank's forward uses its own noise stream (not rank 0's, despite the
buffer broadcast); per-rank seeds give different noise on the two ranks; ``per_rank_seeds=False``
gives the same noise on both.
"""

import copy

import torch
import torch.distributed as dist
from torch import nn

from flatlora_kernels.model_conversion import apply_flat_lora, flat_lora_layers
from flatlora_kernels.schedule import FlatLoraSchedule

from ._dist_utils import spawn

WORLD_SIZE = 2


def _build_model() -> nn.Module:
    torch.manual_seed(0)  # identical replicas on every rank
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    apply_flat_lora(model, "all-linear", r=2, lora_alpha=4, sigma=0.3, fused=True)
    with torch.no_grad():
        for _, layer in flat_lora_layers(model):
            layer.lora_B.normal_(0, 0.2)
    return model


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(WORLD_SIZE)]
    dist.all_gather(out, tensor)
    return out


def _check_mode(rank: int, per_rank_seeds: bool) -> None:
    model = _build_model()
    local = copy.deepcopy(model)  # the same replica without DDP, driven with this rank's stream
    ddp = nn.parallel.DistributedDataParallel(model)
    FlatLoraSchedule(ddp, total_steps=1, seed=3, per_rank_seeds=per_rank_seeds).step()  # rank from the group
    FlatLoraSchedule(local, total_steps=1, seed=3, rank=rank, per_rank_seeds=per_rank_seeds).step()

    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(100 + rank))  # each rank its own batch
    y = ddp(x)
    y.pow(2).sum().backward()
    y_local = local(x)
    y_local.pow(2).sum().backward()
    torch.testing.assert_close(y, y_local, rtol=0, atol=0, msg="DDP forward lost this rank's noise stream")

    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    local_params = dict(local.named_parameters())
    for name, param in lora:
        average = local_params[name].grad.clone()
        dist.all_reduce(average)
        average /= WORLD_SIZE
        torch.testing.assert_close(param.grad, average, rtol=1e-5, atol=1e-6, msg=f"{name}: grad not averaged")
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    # The same probe input on both ranks isolates the noise: outputs differ iff the draws differ.
    probe = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        outputs = _gather(local(probe))
    if per_rank_seeds:
        assert not torch.allclose(outputs[0], outputs[1]), "per-rank seeds gave the same noise"
    else:
        assert torch.equal(outputs[0], outputs[1]), "shared seeds gave different noise"


def _worker(rank: int, world_size: int) -> None:
    for per_rank_seeds in (True, False):
        _check_mode(rank, per_rank_seeds)


def test_ddp_two_cpu_processes():
    spawn(_worker, world_size=WORLD_SIZE, deadline_s=60)
