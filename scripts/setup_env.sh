#!/usr/bin/env bash
# Makes ./.venv ready to run flatlora_kernels, its tests and its demo, then builds the C++ extension.
#
# * A fresh CPU machine: a plain venv with the pinned CPU stack of requirements-cpu.txt
#   (torch==2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build).
# * A machine whose python3 already has torch and triton (e.g. a GPU image without network):
#   a venv that reuses them (--system-site-packages) and downloads nothing.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch, triton" >/dev/null 2>&1; then
    echo "[setup] using the torch/triton already installed for $PYTHON"
    "$PYTHON" -m venv --system-site-packages .venv
    touch .venv/.system-stack
  else
    "$PYTHON" -m venv .venv
  fi
fi

if [ ! -e .venv/.system-stack ] && ! cmp -s requirements-cpu.txt .venv/.requirements-installed; then
  echo "[setup] installing requirements-cpu.txt into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-cpu.txt
  cp requirements-cpu.txt .venv/.requirements-installed
fi

# Rebuild only when the extension is missing or a build input is newer than it (a build takes ~1 min).
built=$(ls flatlora_kernels/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$built" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$built" 2>/dev/null | head -n 1)" ] \
   && (cd / && "$OLDPWD/.venv/bin/python" -c "import flatlora_kernels._C") >/dev/null 2>&1; then  # installed, not just in cwd
  echo "[setup] flatlora_kernels C++ extension is up to date"
else
  echo "[setup] building flatlora_kernels (C++ extension) into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
fi
