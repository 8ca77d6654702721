"""Spawn a small gloo process group on loopback for a test, with a deadline and cleanup on failure."""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30  # a hung collective fails instead of blocking the suite


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int = 2, args: tuple = (), deadline_s: float = 60) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; fail (never hang) past the deadline.

    ``fn`` must be a module-level function (spawned processes import it by name); an exception in
    any rank fails the test with that rank's traceback.
    """
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    context = mp.start_processes(
        _entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} workers did not finish within {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
