"""CI's stack matrix: ``.ci/run`` runs every stack of ``flatlora_kernels.tested_stacks``, each stack's pins
are its requirements file's, and ``info`` says whether the running stack is one of them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flatlora_kernels import info, tested_stacks
from flatlora_kernels.tested_stacks import TESTED_STACKS, matching_stack

ROOT = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    """``{package: version}`` of a requirements file's ``==`` pins, and its ``# python: X.Y`` line."""
    text = path.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))
    python = re.search(r"^# python: *([0-9.]+)", text, re.M)
    if python:
        pins["python"] = python.group(1)
    return pins


def _requirements(stack) -> Path:
    return ROOT / ("requirements-cpu.txt" if stack.name == "default" else f"requirements-{stack.name}.txt")


@pytest.mark.parametrize("stack", TESTED_STACKS, ids=lambda s: s.name)
def test_each_stack_table_entry_is_its_requirements_files_pins(stack):
    pins = _pins(_requirements(stack))
    assert (pins["torch"], pins["triton"]) == (stack.torch, stack.triton)
    if stack.name != "default":  # the default stack is the machine's python3 (setup_env.sh)
        assert pins["python"] == stack.python


def test_ci_runs_every_stack_of_the_table_and_no_other():
    ci = (ROOT / ".ci" / "run").read_text()
    loop = re.search(r"^for name in ([^;]+); do\n\s+entry \"\$name\" bash scripts/test_stack.sh \"\$name\"", ci, re.M)
    assert loop, "expected .ci/run to loop over the stacks with scripts/test_stack.sh"
    assert re.search(r"^entry default default_stack$", ci, re.M)
    assert ["default", *loop.group(1).split()] == [s.name for s in TESTED_STACKS]
    # Every stack's venv is ignored by git, whatever its name.
    assert ".venv-*/" in (ROOT / ".gitignore").read_text().split()


def test_readme_tested_stacks_table_rows_are_the_matrix():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Tested stacks\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README needs a '## Tested stacks' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("| `")]
    names = [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]
    assert names == [s.name for s in TESTED_STACKS]
    for stack, row in zip(TESTED_STACKS, rows):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1:4] == [stack.torch, stack.triton, stack.python], row


def test_info_names_a_tested_stack_and_an_untested_one():
    stack = TESTED_STACKS[-1]
    assert matching_stack(stack.python, stack.torch + "+cu126", stack.triton) == stack
    assert matching_stack(stack.python, "1.0.0", stack.triton) is None
    assert matching_stack(stack.python, stack.torch, None) is None
    line = tested_stacks.stack_line()
    assert line.startswith("stack: Python ") and ("tested in CI" in line or "NOT a stack CI tests" in line)


def test_info_stack_flag_prints_only_the_stack_line():
    done = subprocess.run([sys.executable, "-m", "flatlora_kernels.info", "--stack"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == tested_stacks.stack_line()
    assert info.main(["--bogus"]) == 2
