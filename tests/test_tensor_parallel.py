"""Tensor-parallel ``FlatLoraLinear`` (``flatlora_kernels.distributed.tensor_parallel``): 2 gloo ranks.

Checks, on a colwise -> rowwise MLP: every shard's eps is the unsharded layer's eps restricted to the
shard (global indices into the one stream, row norms reduced across a split row); outputs and the
input/adapter gradients equal one unsharded process; after an optimizer step (new adapter, new seed)
the next forward still matches; the rowwise norm all-reduce is cached within a step. Bad input raises.
"""

import pytest
import torch
from torch import nn

from flatlora_kernels.distributed.tensor_parallel import shard_colwise, shard_noise, shard_rowwise
from flatlora_kernels.modules import FlatLoraLinear
from flatlora_kernels.noise import filter_noise, normal_rows
from flatlora_kernels.schedule import FlatLoraSchedule

from ._dist_utils import spawn


def _build_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(FlatLoraLinear(12, 16, r=2, sigma=0.5), nn.GELU(), FlatLoraLinear(16, 6, r=2, sigma=0.5))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(0, 0.3)
    return model


def _blocks(shard):
    return slice(*shard.rows), slice(*shard.cols)


def _worker(rank, world_size):
    reference = _build_model()
    model = _build_model()
    col, row = shard_colwise(model, "0"), shard_rowwise(model, "2")
    ref_schedule = FlatLoraSchedule(reference, total_steps=3, seed=4, rank=0)
    schedule = FlatLoraSchedule(model, total_steps=3, seed=4, rank=0)  # rank = data-parallel rank, 0 here
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    for step in range(2):
        ref_schedule.step()
        schedule.step()
        for shard, layer in ((col, reference[0]), (row, reference[2])):
            eps = filter_noise(
                layer.weight, layer.lora_A, layer.lora_B, scaling=layer.scaling,
                sigma=layer.effective_sigma(), seed=layer.effective_seed(),
            )
            rows, cols = _blocks(shard)
            torch.testing.assert_close(shard.shard_eps(), eps[rows, cols], rtol=1e-5, atol=1e-7)

        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(step))
        x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y = reference(x_ref), model(x_tp)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4, msg=f"step {step}: output")  # outputs ~10
        cache = row._norm_cache
        model(x_tp.detach())  # a second micro-batch of the same step reuses the norms: no new all-reduce
        assert row._norm_cache is cache
        y_ref.pow(2).sum().backward()
        y.pow(2).sum().backward()
        torch.testing.assert_close(x_tp.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
        for shard, layer in ((col, reference[0]), (row, reference[2])):
            rows, cols = _blocks(shard)
            torch.testing.assert_close(shard.lora_A.grad, layer.lora_A.grad[:, cols], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(shard.lora_B.grad, layer.lora_B.grad[rows], rtol=1e-4, atol=1e-4)
            assert shard.weight.grad is None
        ref_opt.step(); ref_opt.zero_grad()
        opt.step(); opt.zero_grad()

    # The stream really is the global one: the colwise shard's first noise row is global row rows[0].
    z = shard_noise(torch.tensor(9), 12, col.rows, col.cols)
    assert torch.equal(z, normal_rows(9, 12, *col.rows))
    with pytest.raises(ValueError, match="not divisible"):
        shard_rowwise(nn.Sequential(FlatLoraLinear(7, 4)), "0")
    with pytest.raises(TypeError, match="expected a FlatLoraLinear"):
        shard_colwise(nn.Sequential(nn.Linear(4, 4)), "0")


def test_shard_noise_matches_stream_columns():
    # No process group needed: any column block of any rows is the stream's, across lane boundaries.
    seed = torch.tensor(123)
    for k in (5, 12, 13):
        full = normal_rows(seed, k, 2, 7)
        for j0, j1 in ((0, k), (1, k - 1), (k // 2, k)):
            assert torch.equal(shard_noise(seed, k, (2, 7), (j0, j1)), full[:, j0:j1])


def test_tensor_parallel_two_cpu_processes():
    spawn(_worker, world_size=2, deadline_s=60)
