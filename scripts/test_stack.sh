#!/usr/bin/env bash
# The test suite on one stack of the CI matrix, on this CPU machine: scripts/test_stack.sh NAME [pytest args]
#
# NAME's pins are requirements-NAME.txt (its "# python: X.Y" line names the Python); they replace the
# same packages' lines of requirements-cpu.txt in .venv-NAME, built by scripts/setup_env.sh, and the
# C++ extension is built against that venv's torch. Arguments go to pytest (default: the README's test
# command's `tests benchmarks --benchmark-disable`). Stacks: torch2.11 (the lent GPU machine's image),
# newest (what `pip install torch` gives today), floor (the oldest torch/triton pyproject.toml allows).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: scripts/test_stack.sh NAME [pytest args]  (NAME: requirements-NAME.txt)}
shift
requirements=requirements-$name.txt
[ -f "$requirements" ] || { echo "[stack $name] no $requirements" >&2; exit 2; }
version=$(sed -n 's/^# python: *\([0-9][0-9.]*\).*/\1/p' "$requirements" | head -n 1)
[ -n "$version" ] || { echo "[stack $name] $requirements has no '# python: X.Y' line" >&2; exit 2; }

python=
for candidate in "python$version" /root/.pyenv/versions/"$version".*/bin/python"$version"; do  # pyenv's shim may not run it
  if "$candidate" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$version'" >/dev/null 2>&1; then
    python=$candidate; break
  fi
done
if [ -z "$python" ]; then
  echo "[stack $name] no python$version found (PATH, pyenv): install Python $version to test this stack" >&2
  exit 1
fi

# The pins are exact, so this machine's pip cap on torch (a constraints file) is lifted for this install only.
PIP_CONSTRAINT=/dev/null VENV=.venv-$name REQUIREMENTS=$requirements PYTHON="$python" bash scripts/setup_env.sh
".venv-$name/bin/python" -m flatlora_kernels.info --stack
[ $# -gt 0 ] || set -- tests benchmarks --benchmark-disable
".venv-$name/bin/python" -m pytest -q "$@"
