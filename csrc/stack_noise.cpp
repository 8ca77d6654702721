// An expert stack's eps added in place (flatlora_kernels/experts/stack_noise.py; definition:
// flatlora_kernels/noise.py, "Expert stacks"): target[e, i, :] += row_scale[e, i] * z(seed, first_row + e*rows + i, :),
// one rounding to the target's dtype, on rows of any strides (the [E, out, in] view of an [E, in, out] stack).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "normal_stream.h"

namespace flatlora {
namespace {

// Rows per block: an [E, in, out] stack's out x in view has rows contiguous in memory and columns
// strided, so a block of rows is written column by column, a run of kBlock neighbours at a time.
constexpr int64_t kBlock = 16;

template <typename T>
void add_rows(const at::Tensor& target, const float* scales, uint64_t seed, int64_t first_row) {
  // fp64 stacks add the fp32 eps in fp64; every other dtype sums in fp32 and rounds once.
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t experts = target.size(0), rows = target.size(1), cols = target.size(2);
  const int64_t s_expert = target.stride(0), s_row = target.stride(1), s_col = target.stride(2);
  T* data = target.data_ptr<T>();
  const auto row_ptr = [&](int64_t r) { return data + (r / rows) * s_expert + (r % rows) * s_row; };
  const auto add = [&](T* x, float scale, float z) {
    const float eps = scale * z;
    *x = static_cast<T>(static_cast<Acc>(*x) + static_cast<Acc>(eps));
  };
  const int64_t total = experts * rows;
  at::parallel_for(0, (total + kBlock - 1) / kBlock, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> z(static_cast<size_t>(kBlock * cols));
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t r0 = block * kBlock, count = std::min(kBlock, total - r0);
      if constexpr (std::is_same_v<T, float>) {
        if (s_col == 1) {  // the common case: the generator adds into each row itself
          for (int64_t b = 0; b < count; ++b)
            add_scaled_normal_row(seed, first_row + r0 + b, cols, scales[r0 + b], row_ptr(r0 + b));
          continue;
        }
      }
      for (int64_t b = 0; b < count; ++b) normal_row(seed, first_row + r0 + b, cols, z.data() + b * cols);
      if (s_col == 1) {
        for (int64_t b = 0; b < count; ++b) {
          T* row = row_ptr(r0 + b);
          for (int64_t j = 0; j < cols; ++j) add(row + j, scales[r0 + b], z[b * cols + j]);
        }
      } else {
        for (int64_t j = 0; j < cols; ++j)
          for (int64_t b = 0; b < count; ++b) add(row_ptr(r0 + b) + j * s_col, scales[r0 + b], z[b * cols + j]);
      }
    }
  });
}

void add_stack_noise(at::Tensor target, const at::Tensor& row_scale, int64_t seed, int64_t first_row) {
  TORCH_CHECK(target.device().is_cpu() && target.dim() == 3, "add_stack_noise: target must be a 3-D CPU tensor");
  TORCH_CHECK(row_scale.device().is_cpu() && row_scale.scalar_type() == at::kFloat && row_scale.is_contiguous() &&
                  row_scale.numel() == target.size(0) * target.size(1),
              "add_stack_noise: row_scale must be a contiguous fp32 CPU tensor with one value per target row");
  TORCH_CHECK(first_row >= 0, "add_stack_noise: first_row must be >= 0");
  const float* scales = row_scale.data_ptr<float>();
  const uint64_t bits = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, target.scalar_type(), "add_stack_noise",
                                  [&] { add_rows<scalar_t>(target, scales, bits, first_row); });
}

}  // namespace

void register_stack_noise(pybind11::module& m) {
  m.def("add_stack_noise_", &add_stack_noise,
        "target[e, i, :] += row_scale[e, i] * z(seed, first_row + e*rows + i, :) in place (an expert stack's eps)",
        pybind11::arg("target"), pybind11::arg("row_scale"), pybind11::arg("seed"), pybind11::arg("first_row"));
}

}  // namespace flatlora
