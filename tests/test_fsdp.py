"""Flat-LoRA under FSDP2 (``fully_shard``): 2 CPU processes on gloo.

Checks: with shared noise (``per_rank_seeds=False``) and each rank holding half of the same global
batch, FSDP training (per-layer + root sharding, and root only) gives the losses and adapters of one
process training on the whole batch; per-rank noise differs between ranks and is reproducible from
the seed; the frozen base weights stay bit-identical, get no gradient and no optimizer state; a
bf16-parameter / fp32-reduce ``MixedPrecisionPolicy`` trains and keeps the fp32 adapters finite
and close to the fp32 run.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from flatlora_kernels.model_conversion import apply_flat_lora, flat_lora_layers
from flatlora_kernels.schedule import FlatLoraSchedule

from ._dist_utils import full_tensor, needs_cpu_fsdp2, spawn, train_step

STEPS = 3


def _build_model() -> nn.Module:
    torch.manual_seed(0)  # identical replicas on every rank
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    apply_flat_lora(model, "all-linear", r=2, lora_alpha=4, sigma=0.3, fused=True)
    with torch.no_grad():
        for _, layer in flat_lora_layers(model):
            layer.lora_B.normal_(0, 0.2)
    return model


def _train(model, schedule, rank=None, world_size=1):
    """STEPS optimizer steps; each rank takes its slice of the global batch. Returns global losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(STEPS):
        loss = train_step(model, optimizer, schedule, step, rank, world_size)
        if rank is not None:
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss)
    return torch.stack(losses), optimizer


def _shard(model, per_layer: bool, mp_policy=None) -> nn.Module:
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    if per_layer:
        for _, layer in flat_lora_layers(model):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _check_matches_one_process(rank, world_size, per_layer):
    reference = _build_model()
    base_before = {n: p.detach().clone() for n, p in reference.named_parameters() if not p.requires_grad}
    ref_losses, _ = _train(reference, FlatLoraSchedule(reference, total_steps=STEPS, seed=5, rank=0))

    model = _shard(_build_model(), per_layer)
    schedule = FlatLoraSchedule(model, total_steps=STEPS, seed=5, per_rank_seeds=False)
    losses, optimizer = _train(model, schedule, rank, world_size)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg="FSDP losses differ from one process")

    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        full = full_tensor(param.detach())
        if param.requires_grad:
            torch.testing.assert_close(full, ref_params[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(full, base_before[name]), f"{name}: frozen base weight changed"
            assert param.grad is None, f"{name}: frozen base weight received a gradient"
            assert param not in optimizer.state, f"{name}: frozen base weight has optimizer state"


def _noise_probe(model) -> torch.Tensor:
    """Output on one fixed input, the same on every rank: differs across ranks iff the noise does."""
    probe = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(probe)


def _check_per_rank_noise(rank, world_size):
    outputs = []
    for _ in range(2):  # the same run twice: reproducible from the seed alone
        model = _shard(_build_model(), per_layer=True)
        FlatLoraSchedule(model, total_steps=2, seed=9).step()  # rank from the group; factor 1
        outputs.append(_noise_probe(model))
    assert torch.equal(outputs[0], outputs[1]), "per-rank noise not reproducible"
    gathered = [torch.empty_like(outputs[0]) for _ in range(world_size)]
    dist.all_gather(gathered, outputs[0])
    assert not torch.allclose(gathered[0], gathered[1]), "per-rank seeds gave the same noise on two ranks"

    # This rank's draw is the one a single process with rank=<this rank> makes.
    local = _build_model()
    FlatLoraSchedule(local, total_steps=2, seed=9, rank=rank).step()
    torch.testing.assert_close(outputs[0], _noise_probe(local), rtol=1e-5, atol=1e-6)


def _check_mixed_precision(rank, world_size):
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _shard(_build_model(), per_layer=True, mp_policy=policy)
    schedule = FlatLoraSchedule(model, total_steps=STEPS, seed=5, per_rank_seeds=False)
    losses, _ = _train(model, schedule, rank, world_size)
    assert torch.isfinite(losses).all()

    reference = _build_model()
    ref_losses, _ = _train(reference, FlatLoraSchedule(reference, total_steps=STEPS, seed=5, rank=0))
    torch.testing.assert_close(losses, ref_losses, rtol=5e-2, atol=5e-2, msg="bf16 FSDP run far from fp32")
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, f"{name}: sharded parameter not kept in fp32"
        if param.requires_grad:
            assert torch.isfinite(full_tensor(param.detach())).all()


def _worker(rank, world_size):
    for per_layer in (True, False):
        _check_matches_one_process(rank, world_size, per_layer)
    _check_per_rank_noise(rank, world_size)
    _check_mixed_precision(rank, world_size)


@needs_cpu_fsdp2
def test_fsdp2_two_cpu_processes():
    spawn(_worker, world_size=2, deadline_s=90)
