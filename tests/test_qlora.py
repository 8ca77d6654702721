"""Flat-QLoRA (flatlora_kernels.quantized): the 4-bit layout, the ops against the dense path on deq(W),
the noise identity, the layer against PEFT QLoRA, and the base left untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

from flatlora_kernels import FlatLoraSchedule, filter_noise, flat_lora_linear  # noqa: E402
from flatlora_kernels.backends import cpu_tuning  # noqa: E402
from flatlora_kernels.noise import perturbation_row_scale  # noqa: E402
from flatlora_kernels.quantized import (  # noqa: E402
    FlatLoraLinear4bit, Packed4bit, dequantize, flat_qlora_layer_from, flat_qlora_linear, is_bnb_4bit,
)
from flatlora_kernels.quantized import cpp_backend  # noqa: E402

BF16_ULP = 2.0**-8  # bf16's spacing relative to a value in [1, 2)


def quantized(n, k, *, dtype=torch.float32, quant_type="nf4", blocksize=64, nested=True, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(n, k, dtype=dtype) * 0.5
    codes, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                compress_statistics=nested)
    return codes, state


def bnb_dequantize(codes, state):
    """bitsandbytes' own decoder: its CPU kernel where it is right (K % blocksize == 0), else its
    default backend (the CPU kernel of 0.50.2 restarts blocks at each row; layout.py's docstring)."""
    n, k = state.shape
    if k % state.blocksize == 0:
        return bnb_functional.dequantize_4bit(codes, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(codes.reshape(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


LAYOUTS = [  # (n, k, dtype, quant_type, blocksize, nested)
    (24, 128, torch.float32, "nf4", 64, True),
    (24, 96, torch.bfloat16, "fp4", 64, False),  # blocks straddle rows
    (13, 67, torch.float16, "nf4", 32, True),  # odd K: rows start mid-byte
    (8, 256, torch.bfloat16, "nf4", 256, True),
    (6, 50, torch.float32, "fp4", 128, False),  # a block spans three rows
]


@pytest.mark.parametrize("n,k,dtype,quant_type,blocksize,nested", LAYOUTS)
def test_layout_decodes_like_bitsandbytes(n, k, dtype, quant_type, blocksize, nested):
    codes, state = quantized(n, k, dtype=dtype, quant_type=quant_type, blocksize=blocksize, nested=nested)
    packed = Packed4bit.from_quant_state(codes, state)
    expected = bnb_dequantize(codes, state)
    assert torch.equal(dequantize(*packed.op_args()), expected)
    # The C++ chunk builder's decode (per ISA), rounded through the same dtype.
    decoded = cpp_backend._C.dequantize_4bit_rows(*packed.op_args())
    assert torch.equal(decoded, expected.float())


def _layer(n, k, r, *, dtype=torch.float32, lora_dtype=torch.float32, seed=1, **layout):
    codes, state = quantized(n, k, dtype=dtype, seed=seed, **layout)
    packed = Packed4bit.from_quant_state(codes, state)
    gen = torch.Generator().manual_seed(seed + 1)
    lora_A = (torch.randn(r, k, generator=gen) * 0.1).to(lora_dtype)
    lora_B = (torch.randn(n, r, generator=gen) * 0.1).to(lora_dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return packed, lora_A, lora_B, bias


def _run(fn, x, weight, lora_A, lora_B, bias, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B, bias)]
    y = fn(leaves[0], weight, leaves[1], leaves[2], leaves[3], **kwargs)
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(y.shape, generator=gen).to(y.dtype)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


NOISE = dict(scaling=0.75, sigma=0.08, seed=1234)


@pytest.mark.parametrize("n,k,dtype,quant_type,blocksize,nested", LAYOUTS)
def test_cpp_equals_dense_cpp_on_dequantized_weight_bit_for_bit(n, k, dtype, quant_type, blocksize, nested):
    """Same chunks as the dense builder on deq(W): same row norms, same Philox normals, same bits."""
    packed, lora_A, lora_B, bias = _layer(n, k, 4, dtype=dtype, quant_type=quant_type, blocksize=blocksize,
                                          nested=nested)
    dense = dequantize(*packed.op_args())
    x = torch.randn(9, k).to(dtype)  # fp16 compute included (fp32 GEMMs on chunks rounded to fp16)
    quant = _run(flat_qlora_linear, x, packed, lora_A, lora_B, bias, backend="cpp", **NOISE)
    ref = _run(flat_lora_linear, x, dense, lora_A, lora_B, bias, backend="cpp", **NOISE)
    for got, want in zip(quant, ref):
        assert torch.equal(got, want)


def test_row_scales_and_eps_are_the_dequantized_layers():
    """row_scale = sigma ||deq(W) + s*B@A|| / sqrt(K) and eps = the package's stream on those rows
    (read back through x = I: y - y(sigma=0) = eps^T)."""
    n, k = 20, 128
    packed, lora_A, lora_B, _ = _layer(n, k, 4)
    dense = dequantize(*packed.op_args())
    seed, sigma, scaling = torch.tensor(77), torch.tensor(0.3), 0.5
    args = (torch.eye(k), *packed.op_args(), lora_A, lora_B, None, scaling)
    for backend in ("cpp", "reference"):
        y, row_scale = torch.ops.flatlora_q4.forward(*args, sigma, seed, backend)
        y0, _ = torch.ops.flatlora_q4.forward(*args, torch.tensor(0.0), seed, backend)
        want_scale = perturbation_row_scale(dense, lora_A, lora_B, scaling=scaling, sigma=sigma)
        torch.testing.assert_close(row_scale, want_scale, rtol=1e-6, atol=0)
        eps = filter_noise(dense, lora_A, lora_B, scaling=scaling, sigma=sigma, seed=seed)
        torch.testing.assert_close((y - y0).t(), eps, rtol=0, atol=2e-6 * dense.abs().max().item())


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("m", [7, 40])
def test_fp32_outputs_and_gradients_match_dense_reference(backend, m):
    n, k = 48, 160
    packed, lora_A, lora_B, bias = _layer(n, k, 8, blocksize=32)
    dense = dequantize(*packed.op_args())
    x = torch.randn(m, k)
    quant = _run(flat_qlora_linear, x, packed, lora_A, lora_B, bias, backend=backend, **NOISE)
    ref = _run(flat_lora_linear, x, dense, lora_A, lora_B, bias, backend="reference", **NOISE)
    for name, got, want in zip(("y", "dx", "dA", "dB", "dbias"), quant, ref):
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("m", [6, 64])
def test_bf16_within_twice_bf16_rounding_of_dense_reference(m):
    """bf16 compute vs the fp32 dense reference on the same (bf16) inputs: y and dx (the products with
    the perturbed 4-bit weight) within 2x the norm of bf16's own rounding of the dense result, or of
    plain PyTorch's bf16 error where that is larger. dA, dB
    and dbias do not involve W: they are the dense C++ backend's bits (test above), 2.0-2.2x here
    because it rounds s*dy@B to bf16 before the second product; bounded at 2.5x."""
    n, k = 64, 128
    packed, lora_A, lora_B, bias = _layer(n, k, 8, dtype=torch.bfloat16, lora_dtype=torch.bfloat16)
    dense = dequantize(*packed.op_args())
    x = torch.randn(m, k).to(torch.bfloat16)
    quant = _run(flat_qlora_linear, x, packed, lora_A, lora_B, bias, backend="cpp", **NOISE)
    ref32 = _run(flat_lora_linear, x.float(), dense.float(), lora_A.float(), lora_B.float(), bias.float(),
                 backend="reference", **NOISE)
    # Plain PyTorch in bf16 on the same inputs: where its own GEMMs err by more than 2x the output's
    # rounding (torch 2.11's bf16 CPU matmul at M=6: dx 0.36 vs 2 x 0.17), 2x its error is the bar.
    ref16 = _run(flat_lora_linear, x, dense.to(torch.bfloat16), lora_A, lora_B, bias, backend="reference", **NOISE)
    for name, got, want, plain, bound in zip(("y", "dx", "dA", "dB", "dbias"), quant, ref32, ref16, (2, 2, 2.5, 2.5, 2.5)):
        own_rounding = (want.to(torch.bfloat16).float() - want).norm()
        plain_error = (plain.float() - want).norm()
        assert (got.float() - want).norm() <= max(bound * own_rounding, 2 * plain_error), name


def test_chunking_does_not_change_results(monkeypatch):
    """Many chunks (and bf16 dx summed over chunks) give the dense backend's bits under the same cap."""
    n, k = 40, 96
    packed, lora_A, lora_B, bias = _layer(n, k, 4, dtype=torch.bfloat16, lora_dtype=torch.bfloat16)
    dense = dequantize(*packed.op_args())
    x = torch.randn(64, k).to(torch.bfloat16)
    whole = _run(flat_qlora_linear, x, packed, lora_A, lora_B, bias, backend="cpp", **NOISE)
    monkeypatch.setattr(cpu_tuning, "CHUNK_BYTES", 7 * k * 2)
    monkeypatch.setattr(cpu_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
    monkeypatch.setattr(cpu_tuning, "DEQUANTIZED_4BIT_FRACTION", None)
    chunked = _run(flat_qlora_linear, x, packed, lora_A, lora_B, bias, backend="cpp", **NOISE)
    dense_chunked = _run(flat_lora_linear, x, dense, lora_A, lora_B, bias, backend="cpp", **NOISE)
    for got, want, one in zip(chunked, dense_chunked, whole):
        assert torch.equal(got, want)
    assert torch.equal(chunked[0], whole[0])  # y never depends on the chunking


_ISA_SCRIPT = r"""
import hashlib, torch, bitsandbytes.functional as F
from flatlora_kernels.quantized import Packed4bit, flat_qlora_linear
from flatlora_kernels.quantized.cpp_backend import _C
torch.manual_seed(0)
codes, state = F.quantize_4bit(torch.randn(33, 200, dtype=torch.bfloat16), blocksize=64, quant_type="fp4")
packed = Packed4bit.from_quant_state(codes, state)
x = torch.randn(5, 200).to(torch.bfloat16)
a, b = torch.randn(4, 200) * 0.1, torch.randn(33, 4) * 0.1
y = flat_qlora_linear(x, packed, a, b, scaling=0.5, sigma=0.1, seed=3)
w = _C.dequantize_4bit_rows(*packed.op_args())
print(_C.decode_4bit_isa(), hashlib.sha256(y.view(torch.int16).numpy().tobytes() + w.numpy().tobytes()).hexdigest())
"""


def _isa_run(isa):
    env = dict(os.environ, FLATLORA_CPU_ISA=isa) if isa else dict(os.environ)
    env.pop("FLATLORA_CPU_ISA", None) if not isa else None
    out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-2:]


def test_every_isa_decodes_the_same_bits():
    default_isa, default_hash = _isa_run(None)
    for isa in ("scalar", "avx2"):
        got_isa, got_hash = _isa_run(isa)
        assert got_isa == isa
        assert got_hash == default_hash, (isa, default_isa)


# --- the layer ------------------------------------------------------------------------------


def linear4bit(n, k, *, compute_dtype=torch.float32, quant_type="nf4", bias=True, seed=0, quant_storage=None):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(k, n, bias=bias)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                              compress_statistics=True)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def base_digest(layer) -> str:
    state = layer.weight.quant_state
    parts = [layer.weight.data, state.absmax, state.code, layer.bias]
    if state.nested:
        parts += [state.state2.absmax, state.state2.code, state.offset]
    digest = hashlib.sha256()
    for t in parts:
        digest.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_layer_trains_with_noise_and_never_changes_the_base():
    base = linear4bit(32, 64)
    before = base_digest(base)
    layer = FlatLoraLinear4bit.from_linear4bit(base, r=4, lora_alpha=8, sigma=0.1)
    assert layer.base_layer is base and not any(p.requires_grad for p in base.parameters())
    schedule = FlatLoraSchedule(torch.nn.Sequential(layer), total_steps=2)
    schedule.set_step(2)  # full noise
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    x = torch.randn(8, 64)
    losses = []
    for _ in range(2):
        y = layer(x)
        loss = y.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert layer.lora_B.abs().sum() > 0  # B left zero init: it trained
    assert base_digest(base) == before
    # training output differs from the noise-free one (noise is on), eval is plain QLoRA
    layer.train()
    noisy = layer(x)
    layer.eval()
    plain = layer(x)
    assert not torch.allclose(noisy, plain)
    assert base_digest(base) == before
    with pytest.raises(RuntimeError, match="4-bit base"):
        layer.merge()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_sigma_zero_equals_peft_qlora_forward(compute_dtype):
    peft = pytest.importorskip("peft")
    n, k, r = 48, 128, 8
    model = torch.nn.Sequential(linear4bit(n, k, compute_dtype=compute_dtype))
    config = peft.LoraConfig(r=r, lora_alpha=16, target_modules=["0"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, config)
    lora_layer = peft_model.base_model.model[0]
    torch.nn.init.normal_(lora_layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(10, k).to(compute_dtype)
    peft_model.train()
    want = peft_model(x)
    flat = flat_qlora_layer_from(lora_layer.base_layer, lora_layer.lora_A["default"].weight,
                                 lora_layer.lora_B["default"].weight, lora_layer.scaling["default"], sigma=0.0)
    flat.train()
    got = flat(x)
    assert got.dtype == want.dtype
    tol = dict(rtol=1e-5, atol=1e-5) if compute_dtype == torch.float32 else dict(rtol=2 * BF16_ULP, atol=2 * BF16_ULP)
    torch.testing.assert_close(got, want, **tol)


def test_adapter_saves_as_plain_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from flatlora_kernels import save_peft_adapter

    n, k = 32, 64
    base = linear4bit(n, k)
    model = torch.nn.Sequential()
    model.add_module("proj", FlatLoraLinear4bit(base, r=4, lora_alpha=8, sigma=0.0))
    torch.nn.init.normal_(model.proj.lora_B, std=0.1)
    save_peft_adapter(model, str(tmp_path))
    model.eval()
    x = torch.randn(3, k)
    want = model(x)
    plain = torch.nn.Sequential()
    plain.add_module("proj", base)
    peft_model = peft.PeftModel.from_pretrained(plain, str(tmp_path))
    peft_model.train()  # (eval under no_grad would make bitsandbytes repack the shared base: layout.py)
    torch.testing.assert_close(peft_model(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k,dtype,quant_type,blocksize,nested", LAYOUTS[:2])
def test_flat_lora_linear_on_a_packed_weight_is_flat_qlora_linear(n, k, dtype, quant_type, blocksize, nested):
    """One entry point for both bases: ``flat_lora_linear`` on a ``Packed4bit`` gives what the strict
    ``flat_qlora_linear`` gives, bit for bit (output and gradients); a weight that is neither a tensor nor
    a ``Packed4bit`` is a TypeError naming the function."""
    packed, lora_A, lora_B, bias = _layer(n, k, 4, dtype=dtype, quant_type=quant_type, blocksize=blocksize,
                                          nested=nested)
    x = torch.randn(2, 5, k).to(dtype)
    either = _run(flat_lora_linear, x, packed, lora_A, lora_B, bias, backend="cpp", **NOISE)
    strict = _run(flat_qlora_linear, x, packed, lora_A, lora_B, bias, backend="cpp", **NOISE)
    for got, want in zip(either, strict):
        assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(TypeError, match=r"^flat_lora_linear: weight must be a torch.Tensor or a Packed4bit, got list"):
        flat_lora_linear(x, [[0.0] * k] * n, lora_A, lora_B, **NOISE)
    with pytest.raises(TypeError, match=r"^flat_qlora_linear: weight must be a Packed4bit, got Tensor"):
        flat_qlora_linear(x, dequantize(*packed.op_args()), lora_A, lora_B, **NOISE)
    with pytest.raises(TypeError, match=r"^flat_lora_linear: fp64 compute is not supported on a 4-bit base"):
        flat_lora_linear(x.double(), packed, lora_A.double(), lora_B.double(), **NOISE)


def test_bad_input_names_the_problem():
    base = linear4bit(16, 32)
    assert is_bnb_4bit(base) and not is_bnb_4bit(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Linear4bit"):
        FlatLoraLinear4bit(torch.nn.Linear(4, 4))
    eight_bit = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False)
    with pytest.raises(TypeError, match="Linear8bitLt"):
        flat_qlora_layer_from(eight_bit, torch.zeros(2, 32), torch.zeros(16, 2), 1.0, name="model.layers.0.q")
    unquantized = bnb.nn.Linear4bit(32, 16)  # never moved to a device: no quant_state yet
    unquantized.weight.quant_state = None
    with pytest.raises(ValueError, match="no quant_state"):
        Packed4bit.from_linear4bit(unquantized, name="model.layers.3.v_proj")
    repacked = linear4bit(32, 64)  # what bitsandbytes' eval forward does in place on AVX512-BF16 CPUs
    repacked.weight.data, repacked.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        repacked.weight.data, repacked.weight.quant_state)
    with pytest.raises(ValueError, match="model.layers.5.o_proj: bitsandbytes has repacked"):
        Packed4bit.from_linear4bit(repacked, name="model.layers.5.o_proj")
    layer = FlatLoraLinear4bit(base, r=2)
    with pytest.raises(TypeError, match="fp64"):
        flat_qlora_linear(torch.randn(2, 32, dtype=torch.float64), layer.packed, layer.lora_A.double(),
                          layer.lora_B.double(), scaling=1.0, sigma=0.1, seed=0)
    with pytest.raises(ValueError, match="in_features"):
        flat_qlora_linear(torch.randn(2, 31), layer.packed, layer.lora_A, layer.lora_B, scaling=1.0, sigma=0.1, seed=0)


def test_fake_and_meta_shapes():
    packed, lora_A, lora_B, bias = _layer(12, 64, 2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(5, 64)
        y, scale = torch.ops.flatlora_q4.forward(x, *packed.op_args(), lora_A, lora_B, bias, 1.0, torch.tensor(0.1),
                                                 torch.tensor(3), "cpp")
        assert tuple(y.shape) == (5, 12) and tuple(scale.shape) == (12,)


def test_opcheck_forward_op():
    packed, lora_A, lora_B, bias = _layer(12, 64, 2)
    args = (torch.randn(5, 64), *packed.op_args(), lora_A.requires_grad_(), lora_B.requires_grad_(), bias, 1.0,
            torch.tensor(0.1), torch.tensor(3))
    torch.library.opcheck(torch.ops.flatlora_q4.forward_cpu, args, test_utils=("test_schema", "test_faketensor"))


def test_torchao_nf4_maps_onto_the_same_op():
    """torchao's NF4Tensor (skipped where torchao is not installed): its decode equals torchao's own
    get_original_weight bit for bit, and the fused op equals the dense cpp path on that weight."""
    nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    from flatlora_kernels.quantized import is_torchao_nf4, packed_from_torchao_nf4

    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        weight = nf4_tensor.to_nf4(torch.randn(256, 128, dtype=dtype))
        assert is_torchao_nf4(weight) and not is_torchao_nf4(torch.zeros(2))
        packed = packed_from_torchao_nf4(weight, name="layers.0.attn.q_proj")
        dense = weight.get_original_weight()
        assert torch.equal(dequantize(*packed.op_args()), dense)
        lora_A, lora_B = torch.randn(4, 128) * 0.1, torch.randn(256, 4) * 0.1
        x = torch.randn(8, 128).to(dtype)
        got = flat_qlora_linear(x, packed, lora_A, lora_B, backend="cpp", **NOISE)
        assert torch.equal(got, flat_lora_linear(x, dense, lora_A, lora_B, backend="cpp", **NOISE))


def test_torch_compile_fullgraph_matches_eager():
    packed, lora_A, lora_B, bias = _layer(32, 64, 4)

    def step(x, lora_A, lora_B, sigma, seed):
        return flat_qlora_linear(x, packed, lora_A, lora_B, bias, scaling=0.5, sigma=sigma, seed=seed)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        leaves = [t.detach().clone().requires_grad_(True) for t in (torch.ones(8, 64), lora_A, lora_B)]
        y = fn(*leaves, torch.tensor(0.1), torch.tensor(5))
        y.square().sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_step_memory_stays_below_a_dequantized_weight(monkeypatch):
    """Neither deq(W) nor eps exists beyond one chunk: with 64 KiB chunks, a 512x512 fp32 layer's
    fwd+bwd peaks well below one fp32 deq(W) (1 MiB), where the reference backend (which dequantizes)
    goes above it."""
    from flatlora_kernels.memory import PeakMemory

    monkeypatch.setattr(cpu_tuning, "CHUNK_BYTES", 64 * 1024)
    monkeypatch.setattr(cpu_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
    monkeypatch.setattr(cpu_tuning, "DEQUANTIZED_4BIT_FRACTION", None)
    packed, lora_A, lora_B, bias = _layer(512, 512, 4)
    weight_bytes = 512 * 512 * 4
    peaks = {}
    for backend in ("cpp", "reference"):
        x, a, b = (t.detach().clone().requires_grad_(True) for t in (torch.randn(8, 512), lora_A, lora_B))
        cpp_backend.release_chunk_workspace()
        with PeakMemory("cpu") as peak:
            flat_qlora_linear(x, packed, a, b, bias, backend=backend, **NOISE).sum().backward()
        peaks[backend] = peak.bytes
    assert peaks["cpp"] < weight_bytes / 4, peaks
    assert peaks["reference"] > weight_bytes, peaks
