"""Where the package's warnings point: the user's own line, not the library plumbing above it."""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["user_stacklevel"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _is_library_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith((_PACKAGE_DIR, _TORCH_DIR)) or any(
        part in path for part in ("site-packages", "dist-packages", "<frozen")
    )


def user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first caller outside installed libraries and this package
    (the user's ``model(x)`` line rather than torch's or transformers' module plumbing)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _is_library_file(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level
