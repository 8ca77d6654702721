"""The dense weight's ``torch.library`` ops: ``torch.ops.flatlora.forward`` / ``backward`` (``triton_op``s),
``forward_cpu`` / ``backward_cpu`` (the C++ backend's opaque ``custom_op``s), autograd and the eager
CPU shortcut ``EagerCpp``, all declared by ``op_family.OpFamily`` for the weight ``Tensor weight``
(``[out_features, in_features]``). ``functional.flat_lora_linear`` calls them.
"""

from __future__ import annotations

from .op_family import OpFamily

__all__ = ["DENSE_OPS", "forward", "backward", "forward_cpu", "backward_cpu", "EagerCpp"]

DENSE_OPS = OpFamily(
    "flatlora", "Tensor weight", format="dense", out_features=lambda weight: weight.shape[0],
    entry_point="flat_lora_linear", eager_name="EagerCpp",
)  # fmt: skip
forward, backward = DENSE_OPS.forward, DENSE_OPS.backward
forward_cpu, backward_cpu = DENSE_OPS.opaque_ops["cpp"]
EagerCpp = DENSE_OPS.eager
