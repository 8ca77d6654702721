"""Tensor-parallel ``FlatLoraLinear`` (``flatlora_kernels.distributed.tensor_parallel``): 2 gloo ranks.

Checks, on a colwise -> rowwise MLP under ``parallelize_module`` with the DTensor styles: every shard's eps is the unsharded layer's eps restricted
to the shard (global indices into the one stream, row norms reduced across a split row; colwise bit
for bit); outputs and the input/adapter gradients equal one unsharded process; after an optimizer step
(new adapter, new seed) the next forward still matches; parameter placements;
gradient accumulation over micro-batches with the collectives of every forward and backward counted
(the row-norm all-reduce once per step); bf16 weights; LoRA dropout; DCP save/load round trip on 2
ranks and into one unsharded process; a rowwise reduce-scatter output; FSDP2 over TP on a (dp, tp)
mesh; shards with different seeds raise. Bad input raises.
"""

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import parallelize_module

from flatlora_kernels.distributed import load_checkpoint, save_checkpoint
from flatlora_kernels import UnsupportedLayerError
from flatlora_kernels.distributed.tensor_parallel import FlatLoraColwiseParallel, FlatLoraRowwiseParallel
from flatlora_kernels.modules import FlatLoraLinear
from flatlora_kernels.noise import filter_noise
from flatlora_kernels.schedule import FlatLoraSchedule

from ._dist_utils import full_tensor, needs_cpu_fsdp2, save_from_rank_zero, spawn


def _build_model(dtype=torch.float32, lora_dropout=0.0, adapter_seed=None) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(r=2, sigma=0.5, dtype=dtype, lora_dropout=lora_dropout)
    model = nn.Sequential(FlatLoraLinear(12, 16, **kwargs), nn.GELU(), FlatLoraLinear(16, 6, **kwargs))
    if adapter_seed is not None:  # other adapters: a checkpoint load must overwrite them
        torch.manual_seed(adapter_seed)
        for layer in (model[0], model[2]):
            layer.reset_lora_parameters()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(0, 0.3)
    return model


MICRO_BATCHES = 3
_PLACEMENTS = {
    "0.weight": Shard(0), "0.bias": Shard(0), "0.lora_A": Replicate(), "0.lora_B": Shard(0),
    "2.weight": Shard(1), "2.bias": Replicate(), "2.lora_A": Shard(1), "2.lora_B": Replicate(),
}


def _mesh() -> DeviceMesh:
    return DeviceMesh("cpu", [0, 1])


def _tensor_parallel(model: nn.Module) -> nn.Module:
    return parallelize_module(model, _mesh(), {"0": FlatLoraColwiseParallel(), "2": FlatLoraRowwiseParallel()})


def _eps(layer: FlatLoraLinear) -> torch.Tensor:
    """The unsharded layer's eps at its current step."""
    return filter_noise(
        layer.weight, layer.lora_A, layer.lora_B, scaling=layer.scaling,
        sigma=layer.effective_sigma(), seed=layer.effective_seed(),
    )


def _collectives(comm: CommDebugMode) -> dict[str, int]:
    """Counts by op: ``c10d.allreduce_`` is ``dist.all_reduce`` (this package's), ``c10d_functional.*`` DTensor's."""
    return {str(op): n for op, n in comm.get_comm_counts().items() if n}


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _dtensor_worker(rank, world_size, root):
    reference, model = _build_model(), _tensor_parallel(_build_model())
    col, row = model[0], model[2]
    assert {n: p.placements for n, p in model.named_parameters()} == {n: (p,) for n, p in _PLACEMENTS.items()}
    for name, param in reference.named_parameters():
        assert torch.equal(full_tensor(model.get_parameter(name).detach()), param.detach()), name
    ref_schedule = FlatLoraSchedule(reference, total_steps=3, seed=4, rank=0)
    schedule = FlatLoraSchedule(model, total_steps=3, seed=4, rank=0)  # rank = data-parallel rank, 0 here
    ref_opt, opt = _adamw(reference), _adamw(model)

    for step in range(2):
        ref_schedule.step()
        schedule.step()
        for micro in range(MICRO_BATCHES):  # gradient accumulation: one noise draw, several batches
            x = torch.randn(5, 12, generator=torch.Generator().manual_seed(10 * step + micro))
            x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
            y_ref = reference(x_ref)
            with CommDebugMode() as comm:
                y = model(x_tp)
            # Forward: DTensor's all-reduce of the rowwise output on every micro-batch; ours of the squared
            # row norms on the first micro-batch of a step only (+ both layers' one-time seed check).
            expected = {"c10d_functional.all_reduce": 1}
            ours = (micro == 0) + 2 * (step == 0 and micro == 0)
            if ours:
                expected["c10d.allreduce_"] = ours
            assert _collectives(comm) == expected, f"step {step} micro-batch {micro}: forward collectives"
            assert not isinstance(y, DTensor)
            torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4, msg=f"step {step}: output")  # outputs ~10
            y_ref.pow(2).sum().backward()
            with CommDebugMode() as comm:
                y.pow(2).sum().backward()
            # Backward: DTensor's all-reduce of the colwise input gradient; ours of dA (colwise) and dB (rowwise).
            assert _collectives(comm) == {"c10d_functional.all_reduce": 1, "c10d.allreduce_": 2}
            torch.testing.assert_close(x_tp.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
        for layer in (col, row):
            # The unsharded eps of the TP layer's own (gathered) parameters: the reference's adapters
            # differ from them in the last bits after an optimizer step (other reduction order).
            eps = filter_noise(
                *(full_tensor(t.detach()) for t in (layer.weight, layer.lora_A, layer.lora_B)),
                scaling=layer.scaling, sigma=layer.effective_sigma(), seed=layer.effective_seed(),
            )[slice(*layer.rows), slice(*layer.cols)]
            with CommDebugMode() as comm:
                shard_eps = layer.shard_eps()
            assert not _collectives(comm), "the step's row norms were not cached"
            if layer.style == "colwise":
                assert torch.equal(shard_eps, eps), f"step {step}: colwise eps not bit-identical"
            else:  # the squared partial norms are summed in another order than one vector_norm
                torch.testing.assert_close(shard_eps, eps, rtol=1e-6, atol=1e-9)
        ref_params = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            if param.requires_grad:  # accumulated over the micro-batches, replicated ones summed over shards
                assert param.grad.placements == param.placements, name
                torch.testing.assert_close(param.grad.full_tensor(), ref_params[name].grad, rtol=1e-4, atol=1e-4)
            else:
                assert param.grad is None, name
        ref_opt.step(); ref_opt.zero_grad()
        opt.step(); opt.zero_grad()

    # DCP round trip of the trained model, optimizer and schedule (each rank writes its shards).
    save_checkpoint(f"{root}/tp_ckpt", model, opt, schedule)
    resumed = _tensor_parallel(_build_model(adapter_seed=1))
    resumed_opt, resumed_schedule = _adamw(resumed), FlatLoraSchedule(resumed, total_steps=3, seed=0, rank=0)
    load_checkpoint(f"{root}/tp_ckpt", resumed, resumed_opt, resumed_schedule)
    assert resumed_schedule.state_dict() == schedule.state_dict()
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert b.placements == a.placements and torch.equal(b.to_local(), a.to_local()), name
    state, resumed_state = opt.state_dict()["state"], resumed_opt.state_dict()["state"]
    for index in state:
        for key in state[index]:
            assert torch.equal(full_tensor(resumed_state[index][key]), full_tensor(state[index][key])), (index, key)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(99))
    assert torch.equal(resumed(x), model(x)), "the resumed model draws other noise"
    full = {n: full_tensor(p.detach()) for n, p in model.named_parameters()}  # a collective: every rank
    save_from_rank_zero(rank, full, f"{root}/tp_full.pt")


def test_dtensor_styles_two_cpu_processes(tmp_path):
    spawn(_dtensor_worker, world_size=2, args=(str(tmp_path),), deadline_s=60)

    # The 2-rank checkpoint, read by one process into the unsharded model: DCP reassembles the shards.
    model = _build_model(adapter_seed=1)
    load_checkpoint(tmp_path / "tp_ckpt", model, _adamw(model), FlatLoraSchedule(model, total_steps=3, rank=0))
    full = torch.load(tmp_path / "tp_full.pt")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), full[name]), name


def _variants_worker(rank, world_size):
    """bf16 weights and adapters; LoRA dropout (the ranks' RNG in step, as the styles require)."""
    # bf16: the fused op and the shards round W + s*B@A + eps and the partial sums to bf16 at other
    # points (a few bf16 ulps; 8e-3 is too tight for the input gradient).
    for dtype, lora_dropout, tol in ((torch.bfloat16, 0.0, 3e-2), (torch.float32, 0.3, 1e-4)):
        reference = _build_model(dtype, lora_dropout)
        model = _tensor_parallel(_build_model(dtype, lora_dropout))
        for m in (reference, model):
            FlatLoraSchedule(m, total_steps=2, seed=4, rank=0).step()
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
        x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(3)
        y_ref = reference(x_ref)
        torch.manual_seed(3)
        y = model(x_tp)
        what = f"{dtype}, lora_dropout={lora_dropout}"
        torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol, msg=f"{what}: output")
        y_ref.float().pow(2).sum().backward()
        y.float().pow(2).sum().backward()
        # dx is a sum of the ranks' bf16 partials: its rounding scales with the summands, not the sum
        # (one bf16 ulp of a 63 partial is 0.25 on an element that cancels to ~3; seen with torch 2.11).
        grad_scale = x_ref.grad.abs().max().item()
        torch.testing.assert_close(x_tp.grad, x_ref.grad, rtol=tol, atol=tol * max(1.0, grad_scale), msg=f"{what}: input grad")
        ref_params = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            if param.requires_grad:
                ref_grad = ref_params[name].grad
                scale = ref_grad.abs().max().item()  # bf16 gradients reach ~1e3 here: compare relative to the largest
                torch.testing.assert_close(
                    param.grad.full_tensor() / scale, ref_grad / scale, rtol=tol, atol=tol, msg=f"{what}: {name}"
                )


def test_dtensor_bf16_and_dropout_two_cpu_processes():
    spawn(_variants_worker, world_size=2, deadline_s=60)


def _fsdp_over_tp_worker(rank, world_size):
    """FSDP2 over the "dp" dimension of a (dp, tp) mesh, TP inside (dp has size 1 with 2 processes):
    the 2-D parameters train as one process does."""
    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp", "tp"))
    reference, model = _build_model(), _build_model()
    parallelize_module(model, mesh["tp"], {"0": FlatLoraColwiseParallel(), "2": FlatLoraRowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    assert all(p.device_mesh.mesh_dim_names == ("dp", "tp") for p in model.parameters())
    schedules = [FlatLoraSchedule(m, total_steps=3, seed=4, rank=0) for m in (reference, model)]
    optimizers = [_adamw(m) for m in (reference, model)]
    for step in range(2):
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(step))
        y_ref, y = reference(x), model(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4, msg=f"step {step}")
        y_ref.pow(2).sum().backward()
        y.pow(2).sum().backward()
        for optimizer, schedule in zip(optimizers, schedules):
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    with pytest.raises(ValueError, match="1-D tensor-parallel mesh"):
        parallelize_module(_build_model(), mesh, {"0": FlatLoraColwiseParallel()})


@needs_cpu_fsdp2
def test_fsdp2_over_tensor_parallel_two_cpu_processes():
    spawn(_fsdp_over_tp_worker, world_size=2, deadline_s=60)


def _layouts_and_errors_worker(rank, world_size):
    mesh = _mesh()
    # Eval (no noise) with use_local_output=False: the output stays a DTensor sharded on the last dim.
    reference = _build_model()[0].eval()
    layer = parallelize_module(_build_model()[0], mesh, FlatLoraColwiseParallel(use_local_output=False))
    x = torch.randn(3, 12)
    out = layer.eval()(x)
    assert isinstance(out, DTensor) and out.placements[0].is_shard()
    torch.testing.assert_close(out.full_tensor(), reference(x), rtol=1e-5, atol=1e-5)

    # Rowwise into a sequence-parallel layout: the partial outputs are reduce-scattered over dim 0.
    reference, layer_sp = _build_model()[2], _build_model()[2]
    parallelize_module(layer_sp, mesh, FlatLoraRowwiseParallel(output_layouts=Shard(0)))
    for m in (reference, layer_sp):
        FlatLoraSchedule(m, total_steps=2, seed=4, rank=0).step()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    y = layer_sp(x.chunk(world_size, dim=-1)[rank])
    torch.testing.assert_close(y, reference(x).chunk(world_size)[rank], rtol=1e-5, atol=1e-5)

    with pytest.raises(UnsupportedLayerError, match="expected a FlatLoraLinear.*apply_flat_lora"):
        parallelize_module(nn.Sequential(nn.Linear(4, 4)), mesh, {"0": FlatLoraColwiseParallel()})
    with pytest.raises(UnsupportedLayerError, match="embedding"):  # the shared check names what it is
        parallelize_module(nn.Sequential(nn.Embedding(4, 4)), mesh, {"0": FlatLoraColwiseParallel()})
    with pytest.raises(UnsupportedLayerError, match="_SubclassedLayer.*not sharded"):  # e.g. FlatLoraLinear4bit
        parallelize_module(nn.Sequential(_SubclassedLayer(4, 4)), mesh, {"0": FlatLoraColwiseParallel()})
    with pytest.raises(ValueError, match="not divisible"):
        parallelize_module(nn.Sequential(FlatLoraLinear(7, 4)), mesh, {"0": FlatLoraRowwiseParallel()})
    with pytest.raises(RuntimeError, match="already tensor-parallel"):
        parallelize_module(layer, mesh, FlatLoraRowwiseParallel())
    with pytest.raises(NotImplementedError, match="merge"):
        layer.merge()
    with pytest.raises(TypeError, match="not built directly"):
        type(layer)(12, 16)
    # A schedule that reads the global rank gives the two shards different seeds: refused, on both ranks.
    model = _tensor_parallel(_build_model())
    FlatLoraSchedule(model, total_steps=2, seed=4).step()
    with pytest.raises(RuntimeError, match="different seeds"):
        model(torch.randn(5, 12))


class _SubclassedLayer(FlatLoraLinear):
    """A FlatLoraLinear subclass (as the 4-bit layer is): its forward is its own, so it is not sharded."""


def test_dtensor_styles_layouts_eval_and_errors_two_cpu_processes():
    spawn(_layouts_and_errors_worker, world_size=2, deadline_s=60)
