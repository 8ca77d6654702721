"""``torch.library`` ops of the 4-bit layer: ``flatlora_q4::forward`` / ``flatlora_q4::backward``, declared
by ``op_family.OpFamily`` as the dense ops are (``triton_op``s that Inductor traces into on CUDA; on CPU
tensors the opaque C++ ``custom_op``s ``forward_cpu`` / ``backward_cpu``; autograd, fakes, and the eager
CPU shortcut ``EagerCpp4bit``), whose backward regenerates ``deq(W)`` rows and eps from the seed and the
saved row scales. Its backends (format ``"4bit"`` in ``flatlora_kernels.backends``): ``reference``
(dequantizes), ``cpp`` (``csrc/quantized_*.cpp``), ``triton`` (``backends/triton_quantized.py``).

The weight travels as ``Packed4bit.op_args()``: the packed codes, the absmax (fp32, or uint8 codes
with their nested scales, code table and offset), the 4-bit code table, the blocksize, the dtype
bitsandbytes dequantizes to and the shape. Nothing is expanded or copied before the kernels.
"""

from __future__ import annotations

from ..backends import register_format
from ..op_family import OpFamily

__all__ = ["QUANTIZED_OPS", "EagerCpp4bit"]

register_format("4bit", {
    "reference": "flatlora_kernels.quantized.reference",
    "cpp": "flatlora_kernels.quantized.cpp_backend",
    "triton": "flatlora_kernels.backends.triton_quantized",
})  # fmt: skip

QUANTIZED_OPS = OpFamily(
    "flatlora_q4",
    "Tensor codes, Tensor absmax, Tensor code_table, Tensor? nested_absmax, Tensor? nested_code, SymInt blocksize, "
    "SymInt nested_blocksize, float nested_offset, ScalarType weight_dtype, SymInt out_features, SymInt in_features",
    format="4bit", out_features=lambda *weight_args: weight_args[9], entry_point="flat_qlora_linear",
    eager_name="EagerCpp4bit",
)  # fmt: skip
EagerCpp4bit = QUANTIZED_OPS.eager
