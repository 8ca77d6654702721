// Python bindings of flatlora_kernels._C: the cpp backend plus small debug entry points for tests.
#include <torch/extension.h>

#include "flatlora_cpu.h"
#include "cpu_kernels.h"
#include "normal_stream.h"
#include "perturbed_chunk.h"

namespace flatlora {
void register_quantized(pybind11::module& m);  // quantized_bindings.cpp: the 4-bit backend
void register_build_info(pybind11::module& m);  // build_info.cpp: how this extension was compiled
void register_stack_noise(pybind11::module& m);  // stack_noise.cpp: an expert stack's eps, in place
}

namespace {

uint64_t seed_bits(int64_t seed) { return static_cast<uint64_t>(seed); }

// (c0, c1, c2, c3) as int64 tensors holding uint32 values, like flatlora_kernels.noise.philox4x32_10.
std::vector<at::Tensor> philox4x32_10(int64_t seed, const at::Tensor& offsets) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.device().is_cpu(), "offsets must be a CPU int64 tensor");
  const at::Tensor flat = offsets.contiguous().reshape({-1});
  std::vector<uint32_t> words(static_cast<size_t>(flat.numel()) * 4);
  flatlora::philox_at(seed_bits(seed), flat.data_ptr<int64_t>(), flat.numel(), words.data());
  at::Tensor all = at::empty({flat.numel(), 4}, offsets.options());
  int64_t* out = all.data_ptr<int64_t>();
  for (size_t i = 0; i < words.size(); ++i) out[i] = words[i];
  std::vector<at::Tensor> lanes;
  for (int64_t lane = 0; lane < 4; ++lane) lanes.push_back(all.select(1, lane).reshape(offsets.sizes()).clone());
  return lanes;
}

// The generator's Box-Muller of Philox words (int64 tensors holding uint32 values, same shape):
// (z_cos, z_sin) fp32, for comparison with flatlora_kernels.noise's definition.
std::vector<at::Tensor> box_muller(const at::Tensor& bits1, const at::Tensor& bits2) {
  TORCH_CHECK(bits1.scalar_type() == at::kLong && bits2.scalar_type() == at::kLong && bits1.device().is_cpu() &&
                  bits2.device().is_cpu() && bits1.sizes() == bits2.sizes(),
              "box_muller: bits1 and bits2 must be CPU int64 tensors of one shape");
  const at::Tensor words = at::stack({bits1.reshape({-1}), bits2.reshape({-1})});
  TORCH_CHECK(words.numel() == 0 || (words.min().item<int64_t>() >= 0 && words.max().item<int64_t>() < (int64_t{1} << 32)),
              "box_muller: words must lie in [0, 2^32)");
  // The same 32 bits as int32 (two's complement), without relying on a narrowing cast's wrap-around.
  const at::Tensor narrow = at::where(words >= (int64_t{1} << 31), words - (int64_t{1} << 32), words).to(at::kInt);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(narrow.data_ptr<int32_t>());
  const int64_t n = bits1.numel();
  at::Tensor z_cos = at::empty(bits1.sizes(), at::kFloat), z_sin = at::empty(bits1.sizes(), at::kFloat);
  flatlora::cpu_kernels().box_muller_words(w, w + n, n, z_cos.data_ptr<float>(), z_sin.data_ptr<float>());
  return {z_cos, z_sin};
}

// z(seed, i, j) for rows [row_start, row_end), fp32 [rows, K], like flatlora_kernels.noise.normal_rows.
at::Tensor normal_rows(int64_t seed, int64_t in_features, int64_t row_start, int64_t row_end) {
  TORCH_CHECK(in_features > 0 && row_start >= 0 && row_end >= row_start, "bad normal_rows arguments");
  at::Tensor out = at::empty({row_end - row_start, in_features}, at::kFloat);
  float* data = out.data_ptr<float>();
  at::parallel_for(row_start, row_end, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      flatlora::normal_row(seed_bits(seed), row, in_features, data + (row - row_start) * in_features);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Flat-LoRA fused CPU kernels (regenerated Philox noise, chunked perturbed weight)";
  m.def("forward", &flatlora::forward_cpu,
        "y, row_scale = forward(x, W, A, B, bias, s, sigma, seed, chunk_bytes, parallel_grain, workspace_bytes=0)",
        py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("bias"), py::arg("scaling"),
        py::arg("sigma"), py::arg("seed"), py::arg("chunk_bytes"), py::arg("parallel_grain"),
        py::arg("workspace_bytes") = 0);
  m.def("backward", &flatlora::backward_cpu,
        "dx, dA, dB = backward(dy, x, W, A, B, row_scale, s, seed, compute_dx, fold_lora, chunk_bytes, "
        "parallel_grain, workspace_bytes=0)",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("row_scale"),
        py::arg("scaling"), py::arg("seed"), py::arg("compute_dx"), py::arg("fold_lora"), py::arg("chunk_bytes"),
        py::arg("parallel_grain"), py::arg("workspace_bytes") = 0);
  m.def("release_chunk_workspace", &flatlora::release_chunk_workspace,
        "frees the calling thread's reused chunk buffer (memory measurements count its next allocation)");
  m.def("cpu_isa", [] { return std::string(flatlora::cpu_kernels().isa); },
        "the ISA of the noise and row kernels chosen at load time (scalar, avx2, avx512)");
  m.def("philox4x32_10", &philox4x32_10, "Philox4x32-10 outputs for int64 offsets (debug)", py::arg("seed"),
        py::arg("offsets"));
  m.def("box_muller", &box_muller, "debug: the generator's (z_cos, z_sin) of Philox words bits1, bits2",
        py::arg("bits1"), py::arg("bits2"));
  m.def("normal_rows", &normal_rows, "noise normals z for a row range (debug)", py::arg("seed"),
        py::arg("in_features"), py::arg("row_start"), py::arg("row_end"));
  flatlora::register_quantized(m);
  flatlora::register_build_info(m);
  flatlora::register_stack_noise(m);
}
