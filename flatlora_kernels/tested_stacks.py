"""The software stacks CI tests the package on (``.ci/run``'s matrix), for ``python -m flatlora_kernels.info``.

Each entry is one venv of the matrix: the README's default stack (``scripts/setup_env.sh``,
``requirements-cpu.txt``) and each ``scripts/test_stack.sh NAME`` (``requirements-NAME.txt``). The pins
live in those files; this table repeats the versions so an installed package can tell its user whether
their stack is one that was tested, and ``tests/test_tested_stacks.py`` keeps it equal to the files, to
``.ci/run`` and to README's "Tested stacks" table.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

__all__ = ["TestedStack", "TESTED_STACKS", "matching_stack", "stack_line"]


@dataclass(frozen=True)
class TestedStack:
    name: str  # "default", or NAME of requirements-NAME.txt
    python: str  # major.minor
    torch: str
    triton: str
    why: str  # who runs this stack


TESTED_STACKS = (
    TestedStack("default", "3.11", "2.13.0", "3.6.0", "README's commands: the CPU build of torch on this project's machines"),
    TestedStack("torch2.11", "3.12", "2.11.0", "3.6.0", "the lent GPU machine's image"),
    TestedStack("newest", "3.12", "2.15.0", "3.9.0", "what `pip install torch` gives today"),
    TestedStack("floor", "3.11", "2.6.0", "3.2.0", "the oldest torch and triton pyproject.toml allows"),
)


def _running() -> tuple[str, str, str | None]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    python = ".".join(platform.python_version_tuple()[:2])
    return python, torch.__version__.split("+")[0], triton_version


def matching_stack(python: str, torch_version: str, triton_version: str | None) -> TestedStack | None:
    """The tested stack with this Python (major.minor), torch (without its ``+local`` part) and triton."""
    torch_version = torch_version.split("+")[0]
    for stack in TESTED_STACKS:
        if (stack.python, stack.torch, stack.triton) == (python, torch_version, triton_version):
            return stack
    return None


def stack_line() -> str:
    """One line: the running Python/torch/triton and whether CI's matrix tests that combination."""
    python, torch_version, triton_version = _running()
    running = f"Python {python}, torch {torch_version}, triton {triton_version or 'not installed'}"
    stack = matching_stack(python, torch_version, triton_version)
    if stack is not None:
        return f"stack: {running}: tested in CI (matrix entry {stack.name!r}: {stack.why})"
    tested = "; ".join(f"{s.name}: Python {s.python}, torch {s.torch}, triton {s.triton}" for s in TESTED_STACKS)
    return f"stack: {running}: NOT a stack CI tests (tested: {tested})"
