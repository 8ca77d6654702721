"""Run test functions on a small gloo process group on loopback, with deadlines and cleanup on failure.

Starting a process that imports torch costs several seconds on a loaded 2-core machine, so the
ranks are started once per test session (per world size) and reused: each ``spawn`` call sends
one function to every rank and waits for all of them. Any failure or timeout tears the group down
(a rank may be stuck in a collective), and the next call starts a fresh one.
"""

import atexit
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30  # a hung collective fails instead of blocking the suite
START_TIMEOUT_S = 60


# torch 2.6's fully_shard cannot run on CPU: its all-gather calls record_event() on torch.cpu.Stream,
# which has none there (AttributeError inside torch; later releases have it). FSDP2 on CUDA is unaffected.
needs_cpu_fsdp2 = pytest.mark.skipif(
    not hasattr(torch.cpu.Stream, "record_event"),
    reason=f"torch {torch.__version__}: FSDP2 on CPU needs torch.cpu.Stream.record_event (absent in torch 2.6)",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    results.put((rank, "ready", None))
    try:
        while (task := tasks.get()) is not None:
            fn, args = task
            try:
                fn(rank, world_size, *args)
                results.put((rank, "ok", None))
            except BaseException:  # noqa: BLE001 - reported to the test, which fails
                results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class _Group:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.processes = [
            ctx.Process(target=_serve, args=(rank, world_size, port, self.tasks[rank], self.results), daemon=True)
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()
        self._collect("start-up", START_TIMEOUT_S, expected="ready")

    def _collect(self, what: str, timeout_s: float, expected: str = "ok") -> None:
        deadline = time.monotonic() + timeout_s
        errors, done = [], 0
        while done < self.world_size:
            try:
                rank, status, detail = self.results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.processes) if not p.is_alive()]
                raise TimeoutError(f"{what}: ranks did not finish within {timeout_s} s (dead ranks: {dead})")
            done += 1
            if status != expected:
                errors.append(f"-- rank {rank}:\n{detail}")
        if errors:
            raise RuntimeError(f"{what} failed:\n" + "\n".join(errors))

    def run(self, fn, args, deadline_s: float) -> None:
        for task_queue in self.tasks:
            task_queue.put((fn, args))
        self._collect(getattr(fn, "__qualname__", repr(fn)), deadline_s)

    def close(self) -> None:
        for task_queue in self.tasks:
            try:
                task_queue.put(None)
            except (OSError, ValueError):
                pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


_groups: dict[int, _Group] = {}


@atexit.register
def _close_all() -> None:
    while _groups:
        _groups.popitem()[1].close()


def spawn(fn, world_size: int = 2, args: tuple = (), deadline_s: float = 60) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; fail (never hang) past the deadline.

    ``fn`` must be a module-level function (the ranks import it by name); an exception in any rank
    fails the test with that rank's traceback. The default process group stays initialised between
    calls, so ``fn`` must not destroy it.
    """
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    message = None
    try:
        group = _groups.get(world_size) or _groups.setdefault(world_size, _Group(world_size))
        group.run(fn, args, deadline_s)
    except (RuntimeError, TimeoutError) as error:
        message = str(error)
        broken = _groups.pop(world_size, None)
        if broken is not None:
            broken.close()
    if message is not None:  # outside the except block: the ranks' tracebacks are shown once
        pytest.fail(message, pytrace=False)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly DTensor) tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_from_rank_zero(rank: int, obj, path: str) -> None:
    """``torch.save`` on rank 0, for the test process to read once every rank is past this point."""
    if rank == 0:
        torch.save(obj, path)
    dist.barrier()


GLOBAL_BATCH = 8  # the small 8 -> ... -> 4 models of test_fsdp.py and test_dcp.py


def train_step(model, optimizer, schedule, step: int, rank=None, world_size: int = 1) -> torch.Tensor:
    """One optimizer step on the global batch of ``step`` (this rank's slice of it when ``rank`` is
    given); the batch depends only on the step. Returns the detached local MSE loss."""
    gen = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 8, generator=gen), torch.randn(GLOBAL_BATCH, 4, generator=gen)
    if rank is not None:
        x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    # fp32 loss: with a bf16 output and an fp32 target, torch 2.11's mse_loss backward returns an fp32
    # gradient for the bf16 input and autograd rejects it (2.13 accepts it).
    loss = torch.nn.functional.mse_loss(model(x).float(), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    schedule.step()
    return loss.detach()
