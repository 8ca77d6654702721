"""README stays true. CI runs exactly the test command that README gives a new user, and every other
command and snippet of README runs here as written (below: how, and which blocks are exempt)."""

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


# --- every other command and snippet of README runs as written -----------------------------------
#
# A fenced ```bash block holds commands, a ```python block a snippet to paste, an unlabelled block
# printed output. A block that cannot run in a test (GPU only, or minutes long) has the line
# `<!-- readme-test: skip (why) -->` right before it; SKIPPED pins which ones, so the set stays small.
# Commands run in this process (a fresh interpreter would cost more than most of them: torch and
# transformers imports), in a temporary directory whose examples/, benchmarks/ and scripts/ are the
# repository's, so files they write land there; that each names `.venv/bin/python`, the venv
# scripts/setup_env.sh makes, and parses as bash, is checked without running them.

SKIP_MARKER = re.compile(r"<!-- readme-test: skip \((.+?)\) -->\n$")
SKIPPED = {  # first command of each skipped block
    "bash scripts/setup_env.sh && .venv/bin/python -m flatlora_kernels.demo",  # the two commands: CI runs them
    ".venv/bin/python -m flatlora_kernels.demo --task lm",
    ".venv/bin/python -m pytest benchmarks --full --benchmark-json=out/bench.json   # real layer shapes",
    "OUT=out/gpu bash scripts/gpu_check.sh",
}
# Extra arguments for commands whose defaults train for a minute or more: the same code, fewer steps.
TINY_ARGUMENTS = {
    "examples/hf_tiny_llama.py": ["--pretrain-steps", "20", "--steps", "4"],
    "examples/hf_peft_trainer.py": ["--steps", "2"],
}
REPOSITORY_FOLDERS = ("examples", "benchmarks", "scripts")


def _readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, body, skip reason) of every fenced block of README."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):
        before = text[: match.start()]
        skip = SKIP_MARKER.search(before)
        blocks.append((before.count("\n") + 1, match.group(1), match.group(2), skip.group(1) if skip else None))
    return blocks


def _commands(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _runnable(language: str) -> list[tuple[int, str]]:
    return [(line, body) for line, lang, body, skip in _readme_blocks() if lang == language and skip is None]


def test_every_block_is_bash_python_or_output_and_the_skipped_ones_are_few():
    blocks = _readme_blocks()
    assert {lang for _, lang, _, _ in blocks} <= {"bash", "python", ""}
    skipped = {_commands(body)[0] for _, _, body, skip in blocks if skip}
    assert skipped == SKIPPED, "a new skip marker: run the block in this test instead, or add it to SKIPPED with a reason"
    assert _runnable("bash") and _runnable("python")
    for line, lang, body, _ in blocks:
        if lang == "":  # printed output: no command a reader would copy
            assert not any(cmd.lstrip().startswith((".venv/", "python", "bash ")) for cmd in body.splitlines()), f"README.md:{line}"


def test_every_command_names_the_venv_python():
    """Run as written on a fresh clone: a bare `python` has no torch (the venv's has)."""
    text = (ROOT / "README.md").read_text()
    for _, lang, body, _ in _readme_blocks():
        for command in _commands(body) if lang == "bash" else []:
            for part in re.split(r"&&|;", command.split("#")[0]):
                words = part.split()
                program = next((w for w in words if "=" not in w), "")  # past VAR=value prefixes
                assert program in (".venv/bin/python", "bash"), f"{command!r}: run it with .venv/bin/python"
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M))
    bare = [span for span in inline if re.match(r"(python3?|pip|pytest)\s", span)]
    assert not bare, f"commands in the text without .venv/bin/python: {bare}"
    assert "VENV=${VENV:-.venv}" in (ROOT / "scripts" / "setup_env.sh").read_text()  # the venv the commands name


def test_every_bash_block_parses():
    """The commands themselves run in this process (below), past the shell: bash checks their syntax."""
    for line, lang, body, _ in _readme_blocks():
        if lang == "bash":
            done = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"README.md:{line}: {done.stderr}"


@pytest.fixture
def in_scratch_checkout(tmp_path, monkeypatch):
    """A temporary directory that looks like the repository root to README's commands."""
    for folder in REPOSITORY_FOLDERS:
        (tmp_path / folder).symlink_to(ROOT / folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("line, body", _runnable("python"), ids=lambda v: f"README.md:{v}" if isinstance(v, int) else "")
def test_python_snippet_runs(line, body, in_scratch_checkout, capsys):
    try:
        exec(compile(body, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    except ModuleNotFoundError as missing:  # an optional extra (peft, transformers, bitsandbytes) not installed
        if missing.name in ("peft", "transformers", "bitsandbytes", "accelerate"):
            pytest.skip(f"needs {missing.name}")
        raise


def _run_in_process(command: str) -> None:
    """``.venv/bin/python -m module args`` or ``.venv/bin/python path args``, in this process."""
    words = shlex.split(command.split(" #")[0])
    assert words[0] == ".venv/bin/python", command
    target, args = (words[2], words[3:]) if words[1] == "-m" else (words[1], words[2:])
    args += TINY_ARGUMENTS.get(target, [])
    saved = sys.argv
    sys.argv = [target, *args]
    try:
        if words[1] == "-m":  # as `python -m` does: the module runs fresh, not the copy other tests imported
            with pytest.MonkeyPatch.context() as patch:
                patch.delitem(sys.modules, target, raising=False)
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            assert Path(target).is_file(), f"{command!r}: no such file in the repository"
            runpy.run_path(target, run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None), f"{command!r} exited with {done.code}"
    finally:
        sys.argv = saved


@pytest.mark.parametrize("command", [c for _, body in _runnable("bash") for c in _commands(body)])
def test_shell_command_runs(command, in_scratch_checkout, monkeypatch):
    target = command.split()[1 if " -m " not in command else 2]
    if target.startswith("examples/"):
        pytest.importorskip("transformers", reason="the example builds a transformers model")
        if "--trainer" in command or "peft_trainer" in target:
            pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
        monkeypatch.syspath_prepend(str(ROOT / "examples"))
    _run_in_process(command)


def test_works_with_rows_name_tests_that_exist():
    """Each "Works with" row's test file (and test function, where named) exists, so the table stays true."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Works with\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    named = re.findall(r"`(tests/test_\w+\.py)(?:::(\w+))?`", section)
    assert len(named) >= 10
    for path, function in named:
        source = (ROOT / path).read_text()
        assert not function or f"def {function}(" in source, f"README names {path}::{function}, which does not exist"
