"""torch.library ops under opcheck and torch.compile; autocast; activation checkpointing."""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.library import opcheck
from torch.utils.checkpoint import checkpoint

import flatlora_kernels  # noqa: F401  (registers the ops)
from flatlora_kernels import flat_lora_linear
from flatlora_kernels.baselines import naive_flat_lora_linear

from .conftest import make_layer


def _cpp_available():
    try:
        from flatlora_kernels.backends import cpp  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


CPU_BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not _cpp_available(), reason="C++ extension not built"))]
# The Triton backend on CPU runs in the interpreter, where ``wrap_triton`` returns the raw kernel (it
# cannot be traced), so FakeTensor / compile tests of it need CUDA (the GPU tests at the end); eager
# features (autocast, checkpoint) are tested for it here too.
EAGER_BACKENDS = [*CPU_BACKENDS, "triton"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FlatLoraStack(nn.Module):
    """Three Flat-LoRA layers whose seed and sigma live in tensors, as the module API keeps them."""

    def __init__(self, width=24, rank=4, backend="reference", device="cpu"):
        super().__init__()
        self.backend = backend
        layers = [make_layer(width, width, rank, seed=i, device=device) for i in range(3)]
        self.weights = [w for w, _, _, _ in layers]
        self.biases = [b for _, _, _, b in layers]
        self.lora_A = nn.ParameterList([nn.Parameter(a) for _, a, _, _ in layers])
        self.lora_B = nn.ParameterList([nn.Parameter(b) for _, _, b, _ in layers])
        self.register_buffer("seeds", torch.tensor([11, 12, 13], device=device))
        self.register_buffer("sigma", torch.tensor(0.1, device=device))

    def forward(self, x):
        for i in range(3):
            x = flat_lora_linear(
                x, self.weights[i], self.lora_A[i], self.lora_B[i], self.biases[i],
                scaling=2.0, sigma=self.sigma, seed=self.seeds[i], backend=self.backend,
            )
            x = torch.nn.functional.gelu(x)
        return x


def _run(model, x):
    x = x.detach().requires_grad_(True)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    return y.detach(), grads


def _assert_same_run(a, b, rel=1e-4):
    """Outputs and gradients agree to `rel` of each tensor's largest magnitude (fp32 rounding)."""
    for got, want in zip([a[0], *a[1]], [b[0], *b[1]]):
        torch.testing.assert_close(got, want, rtol=rel, atol=rel * want.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_forward_and_backward_ops(backend):
    W, A, B, bias = make_layer(10, 12, 3)
    x = torch.randn(5, 12)
    sigma, seed = torch.tensor(0.1), torch.tensor(3)
    ops = torch.ops.flatlora
    for needs_grad in (False, True):
        args = (x.clone().requires_grad_(needs_grad), W, A.clone().requires_grad_(needs_grad), B, bias, 2.0, sigma, seed, backend)
        opcheck(ops.forward.default, args)
    _, row_scale = ops.forward(x, W, A, B, bias, 2.0, sigma, seed, backend)
    dy = torch.randn(5, 10)
    for compute_dx in (True, False):
        opcheck(ops.backward.default, (dy, x, W, A, B, row_scale, 2.0, seed, compute_dx, backend))
    if backend == "cpp":
        opcheck(ops.forward_cpu.default, (x, W, A, B, bias, 2.0, sigma, seed))
        opcheck(ops.backward_cpu.default, (dy, x, W, A, B, row_scale, 2.0, seed, True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager_and_new_seeds_do_not_recompile(backend):
    model = FlatLoraStack(backend=backend)
    x = torch.randn(2, 7, 24)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)  # fullgraph: any graph break raises
    _assert_same_run(_run(compiled, x), _run(model, x))
    assert counter.frame_count == 1
    for step in range(3):  # what the schedule does every optimizer step: new seeds and sigma, in place
        model.seeds.add_(100)
        model.sigma.fill_(0.05 * step)
        _assert_same_run(_run(compiled, x), _run(model, x))
    assert counter.frame_count == 1, "changing seed or sigma tensors must not recompile"


@pytest.mark.skipif(not _cpp_available(), reason="C++ extension not built")
def test_compile_with_inductor_on_cpu():
    model = FlatLoraStack(backend="cpp")
    x = torch.randn(9, 24, generator=torch.Generator().manual_seed(0))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    # Inductor fuses and reorders the surrounding fp32 reductions (e.g. dbias): rounding differs slightly.
    _assert_same_run(_run(compiled, x), _run(model, x), rel=1e-3)
    model.seeds.add_(1)
    _assert_same_run(_run(compiled, x), _run(model, x), rel=1e-3)
    assert counter.frame_count == 1
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_autocast_bf16_on_cpu(backend):
    W, A, B, bias = make_layer(16, 20, 4)  # fp32 master weights, as in mixed-precision training
    A.requires_grad_(True)
    x = torch.randn(6, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = flat_lora_linear(x, W, A, B, bias, scaling=2.0, sigma=0.1, seed=5, backend=backend)
    assert y.dtype == torch.bfloat16
    expected = naive_flat_lora_linear(x.bfloat16(), W, A, B, bias, scaling=2.0, sigma=0.1, seed=5)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
    (grad_A,) = torch.autograd.grad(y.float().sum(), [A])
    assert grad_A.dtype == torch.float32


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_checkpointed_forward_regenerates_the_same_noise(backend):
    model = FlatLoraStack(backend=backend)
    x = torch.randn(8, 24)
    plain = _run(model, x)
    x_ck = x.clone().requires_grad_(True)
    y = checkpoint(model, x_ck, use_reentrant=False)
    grads = torch.autograd.grad(y.square().sum(), [x_ck, *model.parameters()])
    _assert_same_run((y.detach(), grads), plain)


# --- the same on the GPU (Triton kernels traced through wrap_triton); skipped without CUDA -------


@needs_cuda
def test_opcheck_triton_ops_on_cuda():
    W, A, B, bias = make_layer(40, 72, 8, device="cuda")
    x = torch.randn(33, 72, device="cuda")
    sigma, seed = torch.tensor(0.1, device="cuda"), torch.tensor(3, device="cuda")
    ops = torch.ops.flatlora
    opcheck(ops.forward.default, (x.requires_grad_(True), W, A.requires_grad_(True), B, bias, 2.0, sigma, seed, "triton"))
    _, row_scale = ops.forward(x.detach(), W, A.detach(), B, bias, 2.0, sigma, seed, "triton")
    dy = torch.randn(33, 40, device="cuda")
    for compute_dx in (True, False):
        opcheck(ops.backward.default, (dy, x.detach(), W, A.detach(), B, row_scale, 2.0, seed, compute_dx, "triton"))


@needs_cuda
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_on_cuda(compiler):
    model = FlatLoraStack(width=96, rank=8, backend="triton", device="cuda")
    x = torch.randn(2, 40, 96, device="cuda")
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    _assert_same_run(_run(compiled, x), _run(model, x), rel=1e-3)
    for step in range(3):
        model.seeds.add_(100)
        model.sigma.fill_(0.05 * step)
        _assert_same_run(_run(compiled, x), _run(model, x), rel=1e-3)
    assert counter.frame_count == 1, "changing seed or sigma tensors must not recompile"


@needs_cuda
def test_autocast_bf16_and_checkpoint_on_cuda():
    model = FlatLoraStack(width=96, rank=8, backend="triton", device="cuda")
    x = torch.randn(50, 96, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    plain = _run(model, x)
    x_ck = x.clone().requires_grad_(True)
    y = checkpoint(model, x_ck, use_reentrant=False)
    grads = torch.autograd.grad(y.square().sum(), [x_ck, *model.parameters()])
    _assert_same_run((y.detach(), grads), plain)
