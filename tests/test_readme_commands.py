"""README's two commands stay true: CI runs exactly the test command that README gives a new user."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_readme_test_command_verbatim():
    install_and_demo, install_and_test = _readme_commands()
    assert "flatlora_kernels.demo" in install_and_demo and "pytest" in install_and_test
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install_and_test.strip() in ci_lines


def test_test_command_prints_pass_fail_not_timing_tables():
    _, install_and_test = _readme_commands()
    assert "--benchmark-disable" in install_and_test  # benchmarks run once each; tables belong to the benchmark command
