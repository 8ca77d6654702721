"""Checkpoint and resume with ``flatlora_kernels.distributed`` (``torch.distributed.checkpoint``).

Checks: in one process, stopping after STOP steps and resuming from the checkpoint (adapter +
optimizer + schedule; full and adapter-only) continues bit-identically to an uninterrupted run;
under FSDP2 on 2 gloo ranks the same holds for the sharded checkpoint (per-rank and shared noise); that 2-rank checkpoint
resumed in one process (a different world size, shared noise) continues the run to float tolerance
(the gradient reductions differ in order, so bits may not). Bad arguments raise clear errors.
"""

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from flatlora_kernels.distributed import load_checkpoint, save_checkpoint
from flatlora_kernels.model_conversion import apply_flat_lora, flat_lora_layers
from flatlora_kernels.schedule import FlatLoraSchedule

from ._dist_utils import full_tensor, needs_cpu_fsdp2, save_from_rank_zero, spawn, train_step

TOTAL = 4
STOP = 2


def _build_model(adapter_seed: int = 0) -> nn.Module:
    torch.manual_seed(0)  # the same frozen base everywhere
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    apply_flat_lora(model, "all-linear", r=2, lora_alpha=4, sigma=0.3, fused=True)
    torch.manual_seed(adapter_seed)  # a resumed model starts from other adapters: loading must overwrite them
    with torch.no_grad():
        for _, layer in flat_lora_layers(model):
            layer.lora_A.normal_(0, 0.3)
            layer.lora_B.normal_(0, 0.2)
    return model


def _setup(model, per_rank_seeds=True, seed=11):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return optimizer, FlatLoraSchedule(model, total_steps=TOTAL, seed=seed, per_rank_seeds=per_rank_seeds)


def _run(model, optimizer, schedule, until, rank=None, world_size=1):
    """Train from the schedule's step to ``until``; the batch of a step depends only on the step."""
    losses = []
    while schedule.step_count < until:
        losses.append(train_step(model, optimizer, schedule, schedule.step_count, rank, world_size))
    return torch.stack(losses)


def _adapters(model):
    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **(tol or dict(rtol=0, atol=0)), msg=name)


@pytest.mark.parametrize("adapter_only", [False, True])
def test_single_process_resume_is_bit_identical(tmp_path, adapter_only):
    reference = _build_model()
    ref_optimizer, ref_schedule = _setup(reference)
    full_losses = _run(reference, ref_optimizer, ref_schedule, TOTAL)

    model = _build_model()
    optimizer, schedule = _setup(model)
    first = _run(model, optimizer, schedule, STOP)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, schedule, adapter_only=adapter_only)

    resumed = _build_model(adapter_seed=1)
    optimizer2, schedule2 = _setup(resumed, seed=0)  # wrong seed and step: the checkpoint must restore both
    load_checkpoint(tmp_path / "ckpt", resumed, optimizer2, schedule2, adapter_only=adapter_only)
    assert schedule2.state_dict() == schedule.state_dict()
    rest = _run(resumed, optimizer2, schedule2, TOTAL)
    assert torch.equal(torch.cat([first, rest]), full_losses), "resumed losses differ from the uninterrupted run"
    _assert_same(_adapters(resumed), _adapters(reference))
    ref_state, resumed_state = ref_optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    for index in ref_state:
        for key in ref_state[index]:
            assert torch.equal(ref_state[index][key], resumed_state[index][key]), f"optimizer {index}.{key}"


def test_bad_arguments(tmp_path):
    model = _build_model()
    optimizer, schedule = _setup(model)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "missing", model, optimizer, schedule)
    with pytest.raises(TypeError, match="schedule must be a FlatLoraSchedule"):
        save_checkpoint(tmp_path / "c", model, optimizer, None)
    with pytest.raises(TypeError, match="optimizer must be"):
        save_checkpoint(tmp_path / "c", model, "adam", schedule)


def _sharded():
    model = _build_model()
    for _, layer in flat_lora_layers(model):
        fully_shard(layer)
    return fully_shard(model)


def _fsdp_resume(rank, world_size, path, per_rank_seeds):
    """Uninterrupted vs stopped-and-resumed FSDP run: bit-identical. Returns the final adapters."""
    model = _sharded()
    optimizer, schedule = _setup(model, per_rank_seeds=per_rank_seeds)
    full_losses = _run(model, optimizer, schedule, TOTAL, rank, world_size)
    full_adapters = _adapters(model)

    model = _sharded()
    optimizer, schedule = _setup(model, per_rank_seeds=per_rank_seeds)
    first = _run(model, optimizer, schedule, STOP, rank, world_size)
    save_checkpoint(path, model, optimizer, schedule)

    resumed = _sharded()
    optimizer2, schedule2 = _setup(resumed, per_rank_seeds=not per_rank_seeds, seed=0)
    load_checkpoint(path, resumed, optimizer2, schedule2)
    rest = _run(resumed, optimizer2, schedule2, TOTAL, rank, world_size)
    assert torch.equal(torch.cat([first, rest]), full_losses), f"rank {rank}: FSDP resume not bit-identical"
    _assert_same(_adapters(resumed), full_adapters)
    return full_adapters


def _fsdp_worker(rank, world_size, root):
    _fsdp_resume(rank, world_size, f"{root}/ckpt_per_rank", per_rank_seeds=True)
    # Shared noise, so that a one-process resume can continue the run.
    full_adapters = _fsdp_resume(rank, world_size, f"{root}/ckpt", per_rank_seeds=False)
    save_from_rank_zero(rank, full_adapters, f"{root}/reference.pt")


@needs_cpu_fsdp2
def test_fsdp_resume_and_resume_on_one_process(tmp_path):
    spawn(_fsdp_worker, world_size=2, args=(str(tmp_path),), deadline_s=90)

    # The 2-rank checkpoint, resumed by one process on the whole global batch.
    model = _build_model(adapter_seed=1)
    optimizer, schedule = _setup(model, per_rank_seeds=True, seed=0)
    load_checkpoint(tmp_path / "ckpt", model, optimizer, schedule)
    assert schedule.step_count == STOP and schedule.per_rank_seeds is False
    _run(model, optimizer, schedule, TOTAL)
    _assert_same(_adapters(model), torch.load(tmp_path / "reference.pt"), rtol=1e-5, atol=1e-6)
