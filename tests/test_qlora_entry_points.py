"""Flat-QLoRA through every entry point (issue 24 item 3): a bitsandbytes ``Linear4bit`` base is a kind
of the shared layer check, so ``apply_flat_lora``, ``FlatLoraLinear.from_linear`` and ``from_peft`` build
``FlatLoraLinear4bit`` layers, and ``enable_flat_lora`` patches PEFT's layers over 4-bit bases in place
(both ``lora.Linear`` over a hand-built base and ``lora.bnb.Linear4bit``). The base is never written,
nor repacked by an evaluation forward (hashed). The package runs without bitsandbytes."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from flatlora_kernels import FlatLoraLinear, FlatLoraSchedule, UnsupportedLayerError, apply_flat_lora  # noqa: E402
from flatlora_kernels import disable_flat_lora, enable_flat_lora, flat_lora_layers, from_peft  # noqa: E402
from flatlora_kernels.peft import patched_layers  # noqa: E402
from flatlora_kernels.quantized import FlatLoraLinear4bit, Packed4bit, flat_qlora_linear  # noqa: E402

K, N = 128, 64  # in_features a multiple of every blocksize used: bitsandbytes' own CPU forward is right there


def linear4bit(k=K, n=N, *, quant_type="nf4", seed=0, compute_dtype=torch.float32):
    torch.manual_seed(seed)
    dense = nn.Linear(k, n)
    layer = bnb.nn.Linear4bit(k, n, quant_type=quant_type, compute_dtype=compute_dtype, compress_statistics=True)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def digest(base) -> str:
    state = base.weight.quant_state
    h = hashlib.sha256()
    for t in (base.weight.data, state.absmax, state.code, state.state2.absmax, state.state2.code, base.bias):
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest() + str(getattr(state, "packing_format_for_cpu", False))


class Holder(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.proj = base
        self.head = nn.Linear(N, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def peft_model(base, **config):
    config = dict(dict(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False), **config)
    return peft.get_peft_model(Holder(base), peft.LoraConfig(**config))


def lora_of(model):
    layer = model.base_model.model.proj
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]


def fused_reference(base, x, lora_A, lora_B, scaling, sigma, seed):
    """The 4-bit op called directly: what the training forward must compute at a given sigma and seed."""
    packed = Packed4bit.from_linear4bit(base)
    with torch.no_grad():
        return flat_qlora_linear(x, packed, lora_A, lora_B, base.bias, scaling=scaling, sigma=sigma, seed=seed)


# --- apply_flat_lora, FlatLoraLinear.from_linear, from_peft: FlatLoraLinear4bit layers ---------------


def test_apply_flat_lora_and_from_linear_build_flat_qlora_layers():
    bases = [linear4bit(quant_type="nf4"), linear4bit(N, K, quant_type="fp4", seed=1)]
    model = nn.Sequential(bases[0], nn.ReLU(), bases[1], nn.Linear(K, 4))
    apply_flat_lora(model, "all-linear", r=4, lora_alpha=8, sigma=0.1, lora_dropout=0.1, use_rslora=True)
    assert [type(m) for m in model] == [FlatLoraLinear4bit, nn.ReLU, FlatLoraLinear4bit, FlatLoraLinear]
    assert model[0].base_layer is bases[0] and model[2].base_layer is bases[1]  # shared, not copied
    assert model[0].lora_dropout.p == 0.1 and model[0].scaling == 8 / 2  # rsLoRA: alpha / sqrt(r)
    layer = FlatLoraLinear.from_linear(linear4bit(), r=2, lora_alpha=6, sigma=0.2, use_rslora=False)
    assert type(layer) is FlatLoraLinear4bit and (layer.r, layer.scaling, layer.sigma) == (2, 3.0, 0.2)
    assert layer.lora_A.dtype == torch.float32  # PEFT's adapter dtype over a 4-bit base


def test_from_peft_builds_flat_qlora_layers_with_peft_factors_scaling_and_dropout():
    base = linear4bit()
    model = peft_model(base, lora_dropout=0.2, use_rslora=True, alpha_pattern={"proj": 12})
    layer, lora_A, lora_B, scaling = lora_of(model)
    x = torch.randn(5, K)
    model.eval()
    want = model(x.clone().requires_grad_(True))  # an input that requires grad: bitsandbytes does not repack
    converted = from_peft(model, sigma=0.1)
    flat = converted.proj
    assert type(flat) is FlatLoraLinear4bit and flat.base_layer is base
    assert flat.lora_A is lora_A and flat.lora_B is lora_B and flat.scaling == scaling == 12 / 2
    assert flat.lora_dropout.p == 0.2 and flat.use_rslora
    torch.testing.assert_close(converted(x), want, rtol=1e-5, atol=1e-5)  # eval: plain QLoRA


# --- enable_flat_lora in place, over both PEFT layer classes ------------------------------------


def bnb_peft_model(base):
    """PEFT's QLoRA layer class, which get_peft_model picks for a model transformers loaded in 4 bits."""
    model = Holder(base)
    model.is_loaded_in_4bit = True  # what PEFT reads from such a model
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                      init_lora_weights=False))  # fmt: skip


@pytest.mark.parametrize("peft_class", ["lora.Linear", "lora.bnb.Linear4bit"])
def test_enable_flat_lora_trains_4bit_bases_in_place_through_the_4bit_op(peft_class, monkeypatch):
    base = linear4bit()
    model = peft_model(base) if peft_class == "lora.Linear" else bnb_peft_model(base)
    layer, lora_A, lora_B, scaling = lora_of(model)
    original_class = type(layer)
    assert original_class.__module__ + "." + original_class.__name__ == f"peft.tuners.{peft_class}".replace(
        "lora.Linear", "lora.layer.Linear"
    )
    before = digest(base)
    x = torch.randn(6, K)
    model.train()
    plain = model(x)
    with model.disable_adapter():
        base_alone = model(x)
    enable_flat_lora(model, sigma=0.2)
    assert type(layer) is not original_class and isinstance(layer, original_class)
    assert [name for name, _ in patched_layers(model)] == ["base_model.model.proj"]
    schedule = FlatLoraSchedule(model, total_steps=4)
    schedule.set_step(4)  # factor 1
    got = model.base_model.model.proj(x)
    want = fused_reference(base, x, lora_A, lora_B, scaling, sigma=0.2, seed=layer.effective_seed())
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the 4-bit op with the layer's noise, exactly
    assert not torch.allclose(got, fused_reference(base, x, lora_A, lora_B, scaling, sigma=0.0, seed=0))
    model(x).square().sum().backward()
    assert lora_A.grad.abs().sum() > 0 and lora_B.grad.abs().sum() > 0

    # Evaluation is plain QLoRA by the op at sigma 0, never base_layer(x) (bitsandbytes' eval forward
    # repacks the base in place on AVX512-BF16 CPUs, e.g. this one).
    model.eval()
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda *a: pytest.fail("base_layer(x) was called in eval"))
    with torch.no_grad():
        evaluated = model(x)
        with model.disable_adapter():  # e.g. a DPO reference pass: the base alone, by the op too
            evaluated_base = model(x)
    monkeypatch.undo()
    torch.testing.assert_close(evaluated, plain, rtol=1e-5, atol=1e-5)  # adapter unchanged: no optimizer step
    torch.testing.assert_close(evaluated_base, base_alone, rtol=1e-5, atol=1e-5)

    disable_flat_lora(model)
    assert type(layer) is original_class and not hasattr(layer, "noise_factor")
    model.train()
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    assert digest(base) == before  # the 4-bit base was never written, nor repacked


def test_enable_flat_lora_dropout_correction_gives_peft_qlora_at_sigma_zero():
    base = linear4bit()
    model = peft_model(base, lora_dropout=0.3)
    layer, lora_A, lora_B, scaling = lora_of(model)
    x = torch.randn(6, K)
    model.train()
    torch.manual_seed(11)
    want = model.base_model.model.proj(x)  # PEFT QLoRA, training mode: base_layer(x) + s*B@A@dropout(x)
    enable_flat_lora(model, sigma=0.2)
    FlatLoraSchedule(model, total_steps=4)  # step 0: factor 0
    torch.manual_seed(11)
    got = model.base_model.model.proj(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.manual_seed(11)
    no_dropout = fused_reference(base, x, lora_A, lora_B, scaling, sigma=0.0, seed=0)
    assert not torch.allclose(got, no_dropout)  # the correction is there


def test_saved_adapter_stays_a_plain_peft_adapter(tmp_path):
    base = linear4bit()
    model = peft_model(base)
    enable_flat_lora(model, sigma=0.1)
    before = digest(base)
    schedule = FlatLoraSchedule(model, total_steps=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(6, K)
    for _ in range(2):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == ["base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"]
    model.eval()
    with torch.no_grad():
        want = model(x)
    reloaded = peft.PeftModel.from_pretrained(Holder(linear4bit()), tmp_path)  # vanilla PEFT, fresh 4-bit base
    reloaded.base_model.model.head.load_state_dict(model.base_model.model.head.state_dict())
    reloaded.train()  # (bitsandbytes' eval forward under no_grad would repack its base: compare in train mode)
    torch.testing.assert_close(reloaded(x), want, rtol=1e-5, atol=1e-5)
    assert digest(base) == before


# --- what stays refused, naming the layer -----------------------------------------------------------


class OwnForward4bit(bnb.nn.Linear4bit):
    def forward(self, x):
        return 2 * super().forward(x)


def test_4bit_bases_that_cannot_run_are_refused_by_name():
    own = OwnForward4bit(K, N)
    own.load_state_dict(nn.Linear(K, N).state_dict())
    own = own.to("cpu")
    with pytest.raises(UnsupportedLayerError, match=r"proj'.*forward of its own"):
        enable_flat_lora(peft_model(own))
    with pytest.raises(UnsupportedLayerError, match=r"proj'.*forward of its own"):
        apply_flat_lora(Holder(own), ["proj"])
    repacked = linear4bit()
    if not getattr(repacked, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    repacked.eval()
    with torch.no_grad():
        repacked(torch.randn(2, K))  # bitsandbytes repacks the base in place
    for entry in (lambda: apply_flat_lora(Holder(repacked), ["proj"]), lambda: from_peft(peft_model(repacked)),
                  lambda: enable_flat_lora(peft_model(repacked))):  # fmt: skip
        with pytest.raises(UnsupportedLayerError, match=r"proj'.*CPU inference layout"):
            entry()


# --- PeakMemory, and the package without bitsandbytes ----------------------------------------------


def test_peak_memory_counts_the_reused_4bit_chunk_buffer(monkeypatch):
    """PeakMemory frees the 4-bit op's per-thread chunk buffer on entry too: a pass measured after
    another one still counts its chunk (without that the second measurement drops by the chunk's size)."""
    from flatlora_kernels.memory import PeakMemory
    from flatlora_kernels.backends import cpu_tuning
    from flatlora_kernels.quantized import cpp_backend

    monkeypatch.setattr(cpu_tuning, "DEQUANTIZED_4BIT_FRACTION", 1.0)  # one chunk: all of deq(W)
    base = linear4bit(512, 256)
    packed = Packed4bit.from_linear4bit(base)
    lora_A, lora_B, x = torch.randn(4, 512), torch.randn(256, 4), torch.randn(4, 512)
    peaks = []
    for _ in range(2):
        with PeakMemory("cpu") as peak, torch.no_grad():
            flat_qlora_linear(x, packed, lora_A, lora_B, base.bias, scaling=2.0, sigma=0.1, seed=1, backend="cpp")
        peaks.append(peak.bytes)
    assert peaks[0] == peaks[1] and peaks[0] >= 256 * 512 * 4, peaks


def test_the_package_runs_without_bitsandbytes():
    code = """
import sys
sys.modules["bitsandbytes"] = None  # any import of it fails
import torch
from flatlora_kernels import FlatLoraSchedule, apply_flat_lora, flat_lora_layers
model = apply_flat_lora(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), "all-linear", sigma=0.1)
FlatLoraSchedule(model, total_steps=2).set_step(1)
model(torch.randn(3, 8)).sum().backward()
assert len(flat_lora_layers(model)) == 2 and sys.modules["bitsandbytes"] is None
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
