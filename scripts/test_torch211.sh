#!/usr/bin/env bash
# The test suite on the lent GPU machine's stack (Python 3.12, torch 2.11.0, triton 3.6.0,
# transformers 5.17, peft 0.21), run on this CPU machine in .venv-torch2.11: what imports, registers and
# runs there is checked here before any GPU time is spent. Arguments go to pytest (default: tests benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
python312=
for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do  # pyenv's shim may not run it
  if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1; then
    python312=$candidate; break
  fi
done
if [ -z "$python312" ]; then
  echo "[torch 2.11] no python3.12 found (PATH, pyenv): install Python 3.12 to test the GPU machine's stack" >&2
  exit 1
fi
VENV=.venv-torch2.11 REQUIREMENTS=requirements-torch2.11.txt PYTHON="$python312" bash scripts/setup_env.sh
.venv-torch2.11/bin/python -c "import sys, torch, triton; print(f'[torch 2.11] Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}')"
[ $# -gt 0 ] || set -- tests benchmarks
.venv-torch2.11/bin/python -m pytest -q "$@"
