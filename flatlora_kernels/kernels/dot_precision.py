"""``acc + lhs @ rhs`` with the operand precision fixed at compile time by booleans.

Booleans rather than ``input_precision`` strings as kernel arguments: they are the plainest
constexprs for Triton's cache and for Inductor's kernel wrappers.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot_accumulate(lhs, rhs, acc, UPCAST: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """``UPCAST`` casts both operands to fp32 first (mixed dtypes; the interpreter's wrong bf16 dot).
    ``ALLOW_TF32`` only matters for fp32 operands: TF32 tensor cores, else exact fp32 ("ieee")."""
    if UPCAST:
        lhs = lhs.to(tl.float32)
        rhs = rhs.to(tl.float32)
    if ALLOW_TF32:
        acc = tl.dot(lhs, rhs, acc, input_precision="tf32")
    else:
        acc = tl.dot(lhs, rhs, acc, input_precision="ieee")
    return acc
