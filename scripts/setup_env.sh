#!/usr/bin/env bash
# Makes ./.venv ready to run flatlora_kernels, its tests and its demo, then builds the C++ extension.
#
# * A fresh CPU machine: a plain venv with the pinned CPU stack of requirements-cpu.txt
#   (torch==2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build).
# * A machine whose python3 already has torch and triton (e.g. a GPU image without network):
#   a venv that reuses them (--system-site-packages) and downloads nothing.
# Safe to run again: it only installs what is missing.
#
# Another stack in another venv: VENV=.venv-torch2.11 REQUIREMENTS=requirements-torch2.11.txt PYTHON=python3.12
# (scripts/test_stack.sh NAME does this for each stack of CI's matrix): REQUIREMENTS' pins replace the
# same packages' lines of requirements-cpu.txt. The C++ extension is built in place, one file per Python
# version, so two venvs of one Python share it: it is rebuilt whenever it was built against another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
REQUIREMENTS=${REQUIREMENTS:-requirements-cpu.txt}

if [ ! -x "$VENV/bin/python" ]; then
  if [ "$REQUIREMENTS" = requirements-cpu.txt ] && "$PYTHON" -c "import torch, triton" >/dev/null 2>&1; then
    echo "[setup] using the torch/triton already installed for $PYTHON"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    touch "$VENV/.system-stack"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi

# requirements-cpu.txt, with the lines of the packages that $REQUIREMENTS pins replaced by its pins.
wanted="$VENV/.requirements-wanted"
"$VENV/bin/python" - "$REQUIREMENTS" > "$wanted" <<'PY'
import re, sys
def lines(path):
    return [l.strip() for l in open(path) if l.strip() and not l.lstrip().startswith("#")]
name = lambda line: re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")
override = lines(sys.argv[1]) if sys.argv[1] != "requirements-cpu.txt" else []
pinned = {name(l) for l in override}
print("\n".join([l for l in lines("requirements-cpu.txt") if name(l) not in pinned] + override))
PY

if [ ! -e "$VENV/.system-stack" ] && ! cmp -s "$wanted" "$VENV/.requirements-installed"; then
  echo "[setup] installing $REQUIREMENTS into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$wanted"
  cp "$wanted" "$VENV/.requirements-installed"
fi

# Rebuild only when this venv's extension is missing, a build input is newer than it, or it was built
# against another torch than this venv's (its own build record says which). A build takes minutes:
# README, "Measured times".
suffix=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
built=flatlora_kernels/_C$suffix
venv_python=$(cd "$VENV" && pwd)/bin/python
if [ -e "$built" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$built" 2>/dev/null | head -n 1)" ] \
   && (cd / && "$venv_python" -c "import torch, flatlora_kernels._C as c; assert c.build_info()['torch'] == torch.__version__.split('+')[0]") >/dev/null 2>&1; then  # installed, not just in cwd
  echo "[setup] flatlora_kernels C++ extension is up to date"
else
  echo "[setup] building flatlora_kernels (C++ extension) into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
fi
