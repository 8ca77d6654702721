"""No silent failures (issue 27): every entry point accepts and refuses the same layers, through one
check that names the layer; the opt-in that skips unsupported layers says which; FSDP1, pickling,
deepcopy, hooks, forward overrides, casts and mixed adapter dtypes either work as plain PEFT does or
fail loudly. Warnings and errors are asserted by type and message fragment."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from flatlora_kernels import (
    EFMLoRA,
    FlatLoraLinear,
    FlatLoraSchedule,
    UnsupportedLayerError,
    apply_flat_lora,
    disable_flat_lora,
    enable_flat_lora,
    flat_lora_layers,
    from_peft,
)
from flatlora_kernels.distributed.tensor_parallel import FlatLoraColwiseParallel
from flatlora_kernels.layer_support import BASE_LAYER_KINDS, BaseLayerKind, register_base_layer_kind

from ._dist_utils import spawn

peft = pytest.importorskip("peft")


class Holder(nn.Module):
    """One layer under test, plus a plain linear layer every entry point accepts."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.other = nn.Linear(8, 8)


class Linear8bitLt(nn.Linear):
    """Looks like bitsandbytes' 8-bit class (name and module), without bitsandbytes."""

    __module__ = "bitsandbytes.nn.modules"

    def forward(self, x):
        return super().forward(x)


class Linear4bit(nn.Linear):
    """Looks like bitsandbytes' 4-bit class (a supported kind) whose weight was never quantized."""

    __module__ = "bitsandbytes.nn.modules"


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own: the fused op would skip it."""

    def forward(self, x):
        return 2 * super().forward(x)


def _int8_linear():
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    return layer


def _hooked_linear():
    layer = nn.Linear(8, 8)
    layer.register_forward_hook(lambda module, args, out: out * 2)
    return layer


# (layer factory, fragment of the reason every entry point must give)
REFUSED = {
    "bnb-like 8-bit": (lambda: Linear8bitLt(8, 8), "quantized layer"),
    "bnb-like 4-bit, not quantized": (lambda: Linear4bit(8, 8), "Linear4bit weight.*not quantized yet"),
    "int8 weight": (_int8_linear, "torch.int8 weight"),
    "embedding": (lambda: nn.Embedding(8, 8), "embedding"),
    "convolution": (lambda: nn.Conv2d(8, 8, 1), "convolution"),
    "own forward": (lambda: ScaledLinear(8, 8), "forward of its own"),
    "forward hook": (_hooked_linear, "forward hooks"),
}


def _peft_model(layer: nn.Module):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["layer", "other"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out")  # PEFT's note on a Conv1D target
        return peft.get_peft_model(Holder(layer), config)


@pytest.mark.parametrize("case", list(REFUSED))
def test_every_entry_point_refuses_the_same_layers_by_name(case):
    make, reason = REFUSED[case]
    entry_points = {
        "apply_flat_lora": lambda: apply_flat_lora(Holder(make()), ["layer", "other"]),
        "FlatLoraLinear.from_linear": lambda: FlatLoraLinear.from_linear(make()),
        "tensor-parallel style": lambda: FlatLoraColwiseParallel()._apply(make(), None),
        "enable_flat_lora": lambda: enable_flat_lora(_peft_model(make())),
        "from_peft": lambda: from_peft(_peft_model(make())),
    }
    if case not in ("own forward", "forward hook"):  # FMLoRA calls the layer's forward: only kinds matter
        entry_points["EFMLoRA"] = lambda: EFMLoRA(_peft_model(make()), torch.optim.SGD([torch.zeros(1)], lr=0.1))
    for entry, call in entry_points.items():
        with pytest.raises(UnsupportedLayerError, match=reason) as error:
            call()
        assert "supported:" in str(error.value) and "nn.Linear" in str(error.value), entry
        if entry in ("apply_flat_lora", "enable_flat_lora", "from_peft", "EFMLoRA"):
            assert "layer'" in str(error.value) and "'other'" not in str(error.value), entry


def test_real_bitsandbytes_8bit_and_unquantized_4bit_layers_are_refused():
    bnb = pytest.importorskip("bitsandbytes")
    for layer, reason in (
        (bnb.nn.Linear4bit(8, 8), "not quantized yet"),  # quantized 4-bit bases run (tests/test_qlora_entry_points.py)
        (bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False), "quantized layer"),
    ):
        with pytest.raises(UnsupportedLayerError, match=type(layer).__name__):
            apply_flat_lora(Holder(layer), "all-linear")  # "all-linear" no longer skips or dies inside
        with pytest.raises(UnsupportedLayerError, match=reason):
            from_peft(_peft_model(layer))  # was converted silently, then failed in forward
        with pytest.raises(UnsupportedLayerError, match=reason):
            enable_flat_lora(_peft_model(layer))
        with pytest.raises(UnsupportedLayerError, match=reason):
            FlatLoraLinear.from_linear(layer)


def test_supported_layers_are_accepted_everywhere():
    transformers = pytest.importorskip("transformers")
    for make in (lambda: nn.Linear(8, 8), lambda: transformers.pytorch_utils.Conv1D(8, 8)):
        assert len(flat_lora_layers(apply_flat_lora(Holder(make()), ["layer", "other"]))) == 2
        FlatLoraLinear.from_linear(make())
        assert len(flat_lora_layers(from_peft(_peft_model(make())))) == 2
        enable_flat_lora(_peft_model(make()))
        model = _peft_model(make())
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert len(EFMLoRA(model, torch.optim.SGD(trainable, lr=0.1)).layers) == 2


def test_peft_embedding_lora_is_refused_and_the_opt_in_names_it():
    model = _peft_model(nn.Embedding(8, 8))
    with pytest.raises(UnsupportedLayerError, match=r"layer'.*embedding"):
        from_peft(model)  # used to leave the embedding LoRA in place, training without noise
    with pytest.raises(UnsupportedLayerError, match=r"skip_unsupported=True"):
        enable_flat_lora(model)
    with pytest.warns(UserWarning, match=r"left as they are and train without Flat-LoRA.*layer'.*embedding"):
        enable_flat_lora(model, sigma=0.1, skip_unsupported=True)
    schedule = FlatLoraSchedule(model, total_steps=4)
    assert len(schedule.layers) == 1  # only the linear layer is driven
    schedule.step()
    model.train()
    out = model.base_model.model.other(torch.randn(3, 8))
    assert torch.isfinite(out).all()
    with pytest.warns(UserWarning, match="embedding"):
        converted = from_peft(_peft_model(nn.Embedding(8, 8)), skip_unsupported=True)
    assert [name for name, _ in flat_lora_layers(converted)] == ["other"]


def test_a_registered_base_kind_is_accepted_by_every_entry_point():
    """The one place a new base kind is added (e.g. 4-bit bases routed to a Flat-QLoRA layer)."""
    kind = BaseLayerKind(
        "test-only Linear8bitLt", lambda m: isinstance(m, Linear8bitLt), base_forward=Linear8bitLt.forward
    )
    register_base_layer_kind(kind)
    try:
        apply_flat_lora(Holder(Linear8bitLt(8, 8)), ["layer"])
        enable_flat_lora(_peft_model(Linear8bitLt(8, 8)))
    finally:
        BASE_LAYER_KINDS.remove(kind)
    with pytest.raises(UnsupportedLayerError, match="quantized"):
        apply_flat_lora(Holder(Linear8bitLt(8, 8)), ["layer"])


class RoutedLayer(FlatLoraLinear):
    """What a registered kind's ``flat_layer`` builds in this test."""


class OtherLayer(FlatLoraLinear):
    """A FlatLoraLinear subclass the routed kind does not build."""


def _routed_layer(base, **config):
    plain = nn.Linear(base.in_features, base.out_features)
    plain.weight, plain.bias = base.weight, base.bias
    return RoutedLayer.from_linear(plain, **config)


def test_a_registered_kind_routes_apply_flat_lora_and_from_peft_to_its_layer():
    kind = BaseLayerKind("test-only routed", lambda m: isinstance(m, Linear8bitLt), flat_layer=_routed_layer,
                         patch_in_place=False)
    register_base_layer_kind(kind)
    try:
        model = apply_flat_lora(Holder(Linear8bitLt(8, 8)), ["layer", "other"])
        assert type(model.layer) is RoutedLayer and type(model.other) is FlatLoraLinear
        peft_model = _peft_model(Linear8bitLt(8, 8))
        lora_A = peft_model.base_model.model.layer.lora_A["default"].weight
        converted = from_peft(peft_model)
        assert type(converted.layer) is RoutedLayer and converted.layer.lora_A is lora_A  # PEFT's factors kept
        with pytest.raises(UnsupportedLayerError, match="not patched in place"):
            enable_flat_lora(_peft_model(Linear8bitLt(8, 8)))
        assert type(FlatLoraLinear.from_linear(Linear8bitLt(8, 8))) is RoutedLayer
        with pytest.raises(UnsupportedLayerError, match="run by RoutedLayer"):
            OtherLayer.from_linear(Linear8bitLt(8, 8))
    finally:
        BASE_LAYER_KINDS.remove(kind)


# --- issue 27 item 8: what PEFT's own tests found -------------------------------------------------


def _trained_peft(sigma=0.3):
    torch.manual_seed(0)
    model = peft.get_peft_model(
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False),
    )
    enable_flat_lora(model, sigma=sigma)
    FlatLoraSchedule(model, total_steps=2, seed=1).step()
    return model.train()


@pytest.mark.parametrize("build", ["peft", "apply_flat_lora"])
def test_whole_model_pickles_unpickles_and_deep_copies(build):
    if build == "peft":
        model = _trained_peft()
    else:
        torch.manual_seed(0)
        model = apply_flat_lora(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), sigma=0.3)
        FlatLoraSchedule(model, total_steps=2, seed=1).step()
        model.train()
    x = torch.randn(5, 8)
    expected = model(x)
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)  # same noise state, same forward
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected, rtol=0, atol=0)
    if build == "peft":
        disable_flat_lora(restored)  # the unpickled layers are patched layers like the original's
        assert type(restored.base_model.model[0]).__name__ == "Linear"


def test_deepcopy_has_its_own_warn_once_state():
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
    enable_flat_lora(model, sigma=0.1)
    model.train()
    clone = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no FlatLoraSchedule"):
        model(torch.randn(2, 8))
    with pytest.warns(UserWarning, match="no FlatLoraSchedule"):  # the copy warns too: its state is its own
        clone(torch.randn(2, 8))


def test_hooks_added_after_enabling_fail_loudly():
    model = _trained_peft()
    base = model.base_model.model[0].base_layer
    handle = base.register_forward_hook(lambda module, args, out: out + 1)
    with pytest.raises(RuntimeError, match="forward hooks"):
        model(torch.randn(2, 8))  # the fused op would have skipped the hook (outputs off by the hook)
    handle.remove()
    model(torch.randn(2, 8))
    model.eval()
    base.register_forward_hook(lambda module, args, out: out + 1)
    model(torch.randn(2, 8))  # eval runs PEFT's own forward, which honours the hook


def test_noise_factor_stays_fp32_when_the_model_is_cast():
    model = _trained_peft()
    flat = apply_flat_lora(nn.Sequential(nn.Linear(8, 8)), sigma=0.3)
    FlatLoraSchedule(flat, total_steps=3, seed=0).step()
    for m in (model, flat):
        layers = FlatLoraSchedule(m, total_steps=3).layers
        before = [layer.noise_factor.item() for layer in layers]
        m.to(torch.bfloat16)
        assert all(layer.noise_factor.dtype == torch.float32 for layer in layers)
        assert [layer.noise_factor.item() for layer in layers] == before  # not rounded to bf16
        assert all(p.dtype == torch.bfloat16 for n, p in m.named_parameters())


def test_fp32_adapters_on_a_bf16_base_follow_peft_dtype_rule():
    """Adapter gradients as accurate as PEFT's (vs an fp64 truth): the adapter branch runs in fp32.
    Before, the factors went through the op's bf16 GEMMs: ~1.2x PEFT's error."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"], init_lora_weights=False)
    ).to(torch.bfloat16)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    x = torch.randn(32, 64).to(torch.bfloat16)

    def grads(m, inputs):
        m.train()
        m.zero_grad()
        m(inputs).float().pow(2).sum().backward()
        return {n: p.grad.double() for n, p in m.named_parameters() if p.requires_grad}

    truth = grads(copy.deepcopy(model).double(), x.double())

    def error(g):
        return max(((g[n] - truth[n]).norm() / truth[n].norm()).item() for n in truth)

    peft_error = error(grads(copy.deepcopy(model), x))
    ours = enable_flat_lora(copy.deepcopy(model), sigma=0.0)
    ours_grads = grads(ours, x)
    assert all(g.dtype == torch.float64 for g in ours_grads.values())
    assert error(ours_grads) <= 1.1 * peft_error + 1e-6, (error(ours_grads), peft_error)


def test_trainable_base_weight_is_refused_at_enable_time():
    """Frozen is decided on the registered Parameter when enabling (FSDP1's forward-time views require grad)."""
    for convert in (enable_flat_lora, from_peft):
        model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
        model.base_model.model[0].base_layer.weight.requires_grad_(True)
        with pytest.raises(UnsupportedLayerError, match="weight requires grad"):
            convert(model)


def _fsdp1_worker(rank, world_size):
    from torch.distributed.fsdp import FullyShardedDataParallel

    for build in ("peft", "apply_flat_lora"):
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        if build == "peft":
            model = peft.get_peft_model(plain, peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
            enable_flat_lora(model, sigma=0.3)
        else:
            model = apply_flat_lora(plain, sigma=0.3)
        reference = copy.deepcopy(model)
        schedules = [FlatLoraSchedule(m, total_steps=3, seed=2, per_rank_seeds=False) for m in (model, reference)]
        wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
        ref_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
        for _ in range(2):
            for schedule in schedules:
                schedule.step()
            loss = wrapped(x).pow(2).mean()  # failed here: "the base weight must be frozen"
            ref_loss = reference.train()(x).pow(2).mean()
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            loss.backward()
            ref_loss.backward()
            optimizer.step(), ref_optimizer.step()
            optimizer.zero_grad(), ref_optimizer.zero_grad()


def test_fsdp1_whole_model_trains_like_one_process():
    spawn(_fsdp1_worker, world_size=2, deadline_s=90)
