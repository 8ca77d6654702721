"""Builds the C++ CPU extension ``flatlora_kernels._C`` (torch cpp_extension, ninja, -O3, OpenMP).

One build runs on any CPU of its architecture: no ``-march=native``. The ISA-specific kernels are
compiled once per ISA (``csrc/isa_*.cpp`` set their own targets) and chosen at load time
(``csrc/normal_stream.cpp``; ``FLATLORA_CPU_ISA=scalar|avx2|avx512`` forces a lower level).
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def _compile_args():
    # -fno-math-errno: std::sqrt becomes the (IEEE, vectorisable) sqrt instruction instead of a branch
    # to libm for errno's sake, which a pragma cannot switch off; nothing here reads errno.
    # -ffp-contract=off: GCC's C++ default fuses a * b + c into an FMA wherever the target has one, so
    # the AVX builds and the scalar one rounded differently (row norms, noise updates); the code
    # writes every FMA it wants explicitly (csrc/fast_math.h), so all ISAs compute the same bits.
    return ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]


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
