"""The eager CPU shortcut (``ops.EagerCpp``): it must be taken where it is meant to be, change no
result, and add nothing to the graph (no copies, no view nodes). No timings here."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flatlora_kernels import FlatLoraLinear, flat_lora_linear
from flatlora_kernels._validation import scalar_tensor

from .conftest import make_layer


class _Passthrough(TorchDispatchMode):
    """An active dispatch mode: flat_lora_linear must then go through the torch.library ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _run(x_shape, dtype, mode=None):
    W, A, B, bias = make_layer(8, 6, 3, dtype=dtype)
    A.requires_grad_(True)
    B.requires_grad_(True)
    bias.requires_grad_(True)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
    with mode or contextlib.nullcontext():
        y = flat_lora_linear(x, W, A, B, bias, scaling=2.0, sigma=0.1, seed=5)
        y.backward(torch.ones_like(y))
    op_node = y.grad_fn if len(x_shape) == 2 else y.grad_fn.next_functions[0][0]  # under the reshape
    return type(op_node).__name__, (y.detach(), x.grad, A.grad, B.grad, bias.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(4, 6), (2, 3, 6)])
def test_eager_shortcut_matches_the_ops_bit_for_bit(dtype, x_shape):
    fast_node, fast = _run(x_shape, dtype)
    op_node, through_ops = _run(x_shape, dtype, mode=_Passthrough())
    assert fast_node == "EagerCppBackward" and op_node != fast_node
    for a, b in zip(fast, through_ops):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_two_dim_input_adds_no_view_node():
    W, A, B, _ = make_layer(8, 6, 3)
    A.requires_grad_(True)
    x = torch.randn(4, 6, requires_grad=True)
    y = flat_lora_linear(x, W, A, B, scaling=2.0, sigma=0.1, seed=5)
    first_input_node = y.grad_fn.next_functions[0][0]
    assert type(first_input_node).__name__ == "AccumulateGrad" and first_input_node.variable is x


def test_matching_scalar_tensors_are_not_copied():
    layer = FlatLoraLinear(6, 8, r=2)
    seed = scalar_tensor(layer.noise_seed, torch.int64, torch.device("cpu"))
    assert seed.data_ptr() == layer.noise_seed.data_ptr()
    moved = scalar_tensor(torch.tensor([3]), torch.int64, torch.device("cpu"))  # 1-element, not 0-dim
    assert moved.shape == () and int(moved) == 3
    cast = scalar_tensor(torch.tensor(0.5, dtype=torch.float64), torch.float32, torch.device("cpu"))
    assert cast.dtype == torch.float32 and float(cast) == 0.5
    for value, dtype in ((0.1, torch.float32), (2**63 - 1, torch.int64)):  # numbers: torch.tensor's value
        made = scalar_tensor(value, dtype, torch.device("cpu"))
        assert made.shape == () and made.dtype == dtype and torch.equal(made, torch.tensor(value, dtype=dtype))


def test_shortcut_steps_aside_for_whatever_intercepts_the_ops():
    from flatlora_kernels.op_family import eager_applies as eager_cpp_applies

    x = torch.randn(2, 3)
    assert eager_cpp_applies((x, torch.nn.Parameter(x), None))
    with torch.autograd.forward_ad.dual_level():
        assert not eager_cpp_applies((x,))
    with _Passthrough():
        assert not eager_cpp_applies((x,))
    seen = []
    with warnings.catch_warnings():  # torch.jit.trace is deprecated (a DeprecationWarning, a FutureWarning from 2.15), still supported
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(lambda t: seen.append(eager_cpp_applies((t,))) or t * 2, (x,), check_trace=False)
    assert seen == [False]
    with torch.overrides.TorchFunctionMode():
        assert not eager_cpp_applies((x,))

    class Subclass(torch.Tensor):
        pass

    assert not eager_cpp_applies((x.as_subclass(Subclass),))
