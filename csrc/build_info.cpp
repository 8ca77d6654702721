// What the built extension itself knows about its build, for `python -m flatlora_kernels.info`: the
// compiler's predefined macros say how this object was compiled, whatever setup.py says today.
#include <torch/extension.h>
#include <torch/version.h>

namespace flatlora {

void register_build_info(pybind11::module& m) {
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
#if defined(__clang__)
        info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
        info["compiler"] = std::string("gcc ") + __VERSION__;
#else
        info["compiler"] = std::string("unknown");
#endif
        info["cplusplus"] = static_cast<long>(__cplusplus);
#ifdef __OPTIMIZE__
        info["optimized"] = true;
#else
        info["optimized"] = false;
#endif
#ifdef __NO_MATH_ERRNO__
        info["math_errno"] = false;  // -fno-math-errno: sqrt is the instruction (csrc/fast_math.h)
#else
        info["math_errno"] = true;
#endif
#ifdef __FAST_MATH__
        info["fast_math"] = true;  // would break the bit-identical stream across ISAs
#else
        info["fast_math"] = false;
#endif
#ifdef _OPENMP
        info["openmp"] = static_cast<long>(_OPENMP);
#else
        info["openmp"] = pybind11::none();
#endif
        info["torch"] = std::string(TORCH_VERSION);
        return info;
      },
      "how this extension was compiled: compiler, C++ standard, optimisation, math-errno, fast-math, OpenMP "
      "version and the torch version whose headers it was built against");
}

}  // namespace flatlora
