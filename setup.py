"""Builds the C++ CPU extension ``flatlora_kernels._C`` (torch cpp_extension, ninja, -O3, OpenMP).

One build runs on any CPU of its architecture: no ``-march=native``. The ISA-specific kernels are
compiled once per ISA (``csrc/isa_*.cpp`` set their own targets) and chosen at load time
(``csrc/normal_stream.cpp``; ``FLATLORA_CPU_ISA=scalar|avx2|avx512`` forces a lower level).
"""

import glob
import os
import re
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# torch's headers state the C++ standard they need (ATen/ATen.h: `#if __cplusplus < 201703L #error ...`;
# C++17 in torch 2.13, C++20 in 2.15). The build asks for the oldest standard that satisfies them, so
# it follows the torch it is built against: read from the header, not kept in a version table here.
_STANDARDS = {"c++17": 201703, "c++20": 202002, "c++23": 202302}  # -std= value: its __cplusplus


def _cxx_standard() -> str:
    header = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        found = re.search(r"__cplusplus\s*<\s*(\d{6})L", open(header).read())
    except OSError:
        found = None
    needed = int(found.group(1)) if found else _STANDARDS["c++17"]  # torch's floor before it said so
    return min((s for s, value in _STANDARDS.items() if value >= needed), key=_STANDARDS.get, default="c++23")


def _check_compiler(standard: str) -> None:
    """Stop with a clear message when the C++ compiler lacks the standard this torch needs (rather than
    torch's header errors deep in the build log)."""
    compiler = os.environ.get("CXX", "c++")
    probe_source = f"#if __cplusplus < {_STANDARDS[standard]}L\n#error too old\n#endif\n"
    try:
        probe = subprocess.run(
            [compiler, f"-std={standard}", "-x", "c++", "-fsyntax-only", "-"],
            input=probe_source, capture_output=True, text=True,
        )
    except OSError as error:
        sys.exit(f"flatlora_kernels: no C++ compiler ({compiler}: {error}); the CPU extension needs {standard}")
    if probe.returncode != 0:
        sys.exit(
            f"flatlora_kernels: torch {torch.__version__} needs a {standard.upper()} compiler, and {compiler} "
            f"does not provide it with -std={standard}. Install a newer GCC or Clang (GCC 10+ for C++20) "
            "or point CXX at one."
        )


def _compile_args():
    # -fno-math-errno: std::sqrt becomes the (IEEE, vectorisable) sqrt instruction instead of a branch
    # to libm for errno's sake, which a pragma cannot switch off; nothing here reads errno.
    # -ffp-contract=off: GCC's C++ default fuses a * b + c into an FMA wherever the target has one, so
    # the AVX builds and the scalar one rounded differently (row norms, noise updates); the code
    # writes every FMA it wants explicitly (csrc/fast_math.h), so all ISAs compute the same bits.
    standard = _cxx_standard()
    _check_compiler(standard)
    return ["-O3", f"-std={standard}", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]


setup(
    ext_modules=[
        CppExtension(
            name="flatlora_kernels._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=_compile_args(),
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
