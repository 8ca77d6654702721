"""Peak memory of a block of code, on CUDA and on the CPU, and the bytes autograd saves for backward.

* CUDA: ``reset_peak_memory_stats`` + ``max_memory_allocated`` (the caching allocator's own count).
* CPU: PyTorch has no CPU allocator statistics, so the block runs under the profiler with
  ``profile_memory=True``, whose ``[memory]`` events record every CPU allocation and free, including
  those made inside C++ ops; the peak is the running maximum of their sum. The profiler slows the
  block down: measure memory and time in separate runs.

Both report the peak *above* what was allocated when the block started (activations, gradients and
temporaries; not the model already in memory). On CPU the C++ backend's per-thread chunk buffers
(the dense and the 4-bit op's), which outlive calls, are freed on entry, so the block's first pass
allocates (and counts) them again.

``SavedTensorBytes`` counts what autograd keeps for backward while a block runs (its
``saved_tensors_hooks``): each storage once, the module's parameters and buffers left out (they
exist anyway). Deterministic, unlike a peak, so tests can compare it exactly.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["PeakMemory", "SavedTensorBytes"]


@contextlib.contextmanager
def _quiet_native_stderr():
    """Kineto writes a line to the process's stderr at every profiler start and stop; hide those."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# c10's CPU allocator logs this line (to the process's stderr, not through Python's warnings) when a
# tensor made before the profiler started is freed inside the measured block: expected here, since
# the block frees what the caller made before it, and it says nothing about the peak we report.
_ALLOCATOR_NOTICE = re.compile(rb"CPUAllocator\.cpp:\d+\] Memory block of unknown size was allocated before the profiling started")


class _StderrWithoutAllocatorNotice:
    """Sends the process's stderr (fd 2) to a temporary file from ``start`` to ``stop``, then writes
    back every line except c10's allocator notice above: anything else printed there is kept."""

    def start(self) -> None:
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._file = tempfile.TemporaryFile()
        os.dup2(self._file.fileno(), 2)

    def stop(self) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        kept = b"".join(line for line in self._file if not _ALLOCATOR_NOTICE.search(line))
        self._file.close()
        if kept:
            os.write(2, kept)


def _release_cpp_chunk_workspace() -> None:
    """Free the C++ backend's reused chunk buffers: the dense op's and the 4-bit op's."""
    try:
        from . import _C
    except ImportError:  # the C++ extension is not built: nothing held
        return
    _C.release_chunk_workspace()
    try:
        from .quantized import cpp_backend
    except ImportError:  # the 4-bit backend is not importable: nothing held
        return
    cpp_backend.release_chunk_workspace()


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` / ``peak.mib``."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._profiler = None

    @property
    def mib(self) -> float | None:
        return None if self.bytes is None else self.bytes / 2**20

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            _release_cpp_chunk_workspace()
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._stderr = _StderrWithoutAllocatorNotice()
            self._stderr.start()
            try:
                with _quiet_native_stderr():
                    self._profiler.__enter__()
            except BaseException:
                self._stderr.stop()
                raise
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._profiler is not None:
            try:
                with _quiet_native_stderr():
                    self._profiler.__exit__(*exc)
            finally:
                self._stderr.stop()
            events = self._profiler.profiler.kineto_results.events()
            changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
            current = peak = 0
            for _, nbytes in changes:
                current += nbytes
                peak = max(peak, current)
            self.bytes = peak
        return False


class SavedTensorBytes:
    """``with SavedTensorBytes(model) as saved: loss = model(x)...`` then ``saved.bytes``: the bytes
    of the distinct storages autograd saved for backward inside the block, less ``model``'s
    parameters and buffers (``model`` may be None) and ``also_held`` (other tensors that exist anyway,
    e.g. a 4-bit weight's quantization state). ``saved.tensors``: ``(dtype, shape)`` of each."""

    def __init__(self, model: torch.nn.Module | None = None, also_held=()):
        held = [*also_held] + ([] if model is None else [*model.parameters(), *model.buffers()])
        self._held = {t.untyped_storage().data_ptr() for t in held}
        self._storages: dict[int, tuple[int, torch.dtype, tuple]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._held and storage.nbytes():
            self._storages[storage.data_ptr()] = (storage.nbytes(), tensor.dtype, tuple(tensor.shape))
        return tensor

    @property
    def bytes(self) -> int:
        return sum(nbytes for nbytes, _, _ in self._storages.values())

    @property
    def tensors(self) -> list[tuple[torch.dtype, tuple]]:
        return [(dtype, shape) for _, dtype, shape in self._storages.values()]

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._hooks.__exit__(*exc)
        return False
