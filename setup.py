"""Builds the C++ CPU extension ``flatlora_kernels._C`` (torch cpp_extension, ninja, -O3, OpenMP).

Set ``FLATLORA_PORTABLE=1`` to build without ``-march=native`` (for a binary that moves to other CPUs).
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def _compile_args():
    args = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("FLATLORA_PORTABLE") != "1":
        args.append("-march=native")
    return args


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
