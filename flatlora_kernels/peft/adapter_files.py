"""Adapter files, both formats: a standard PEFT adapter directory and this package's safetensors file.

A trained Flat-LoRA adapter is a plain LoRA adapter (the noise is a training-time device only), so
``save_peft_adapter`` writes what ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` (a
``peft.LoraConfig``) and ``adapter_model.safetensors`` with keys ``base_model.model.<layer>.lora_A.weight``
/ ``.lora_B.weight`` and the heads of ``modules_to_save`` as ``base_model.model.<head>.<tensor>``.
``PeftModel.from_pretrained(base, directory)``, vLLM or TGI then load it without this package.
Per-layer ranks and alphas go to ``rank_pattern`` / ``alpha_pattern`` keyed by the full layer name.
``load_peft_adapter`` reads such a directory (ours or one PEFT wrote) into a model converted by
``apply_flat_lora`` with the same targets.

``save_adapter`` / ``load_adapter``: one safetensors file holding ``<layer name>.lora_A`` / ``.lora_B``
(and the heads' tensors), with each layer's configuration (and, optionally, the schedule's state)
as JSON in the metadata.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import torch
from torch import Tensor, nn

from ..model_conversion import flat_lora_layers, modules_to_save_of, unwrap_model

__all__ = ["save_peft_adapter", "load_peft_adapter", "save_adapter", "load_adapter"]

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_METADATA_LAYERS = "flatlora.layers"
_METADATA_SCHEDULE = "flatlora.schedule"
_METADATA_HEADS = "flatlora.modules_to_save"


def _peft_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _cpu(tensor: Tensor) -> Tensor:
    return tensor.detach().cpu().contiguous()


def _head_tensors(model: nn.Module, heads: list[str], prefix: str = "") -> dict[str, Tensor]:
    inner = unwrap_model(model)
    return {
        f"{prefix}{head}.{key}": _cpu(tensor)
        for head in heads
        for key, tensor in inner.get_submodule(head).state_dict().items()
    }


def _load_heads(model: nn.Module, heads: list[str], get_tensor, prefix: str = "") -> None:
    inner = unwrap_model(model)
    for head in heads:
        module = inner.get_submodule(head)
        module.load_state_dict({key: get_tensor(f"{prefix}{head}.{key}") for key in module.state_dict()})


def _check_same_layers(function: str, source: str, saved: set[str], layers: dict) -> None:
    if saved != set(layers):
        raise ValueError(
            f"{function}: layer names differ between {source} and the model; missing from {source}: "
            f"{sorted(set(layers) - saved)[:5]}, not in the model: {sorted(saved - set(layers))[:5]}"
        )


def _copy_factors(function: str, source: str, name: str, layer, get_tensor) -> None:
    """``layer.lora_A`` / ``lora_B`` <- the saved tensors, in place (Parameters keep their identity)."""
    for attr in ("lora_A", "lora_B"):
        tensor, target = get_tensor(attr), getattr(layer, attr)
        if tensor.shape != target.shape:
            raise ValueError(
                f"{function}: {name}.{attr} is {tuple(tensor.shape)} in {source}, {tuple(target.shape)} in the model"
            )
        target.copy_(tensor)


# --- PEFT's directory format ----------------------------------------------------------------------


def save_peft_adapter(model: nn.Module, save_directory: str) -> None:
    """Write the adapter of a model built with ``apply_flat_lora`` as a PEFT LoRA directory.

    Raises when a layer's scale is not what PEFT derives from its rank and alpha (e.g. a scale set by
    hand), or when layers mix rsLoRA and plain scaling: PEFT could not reproduce those outputs.
    """
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("save_peft_adapter needs the peft package: pip install peft") from error
    from safetensors.torch import save_file

    layers = flat_lora_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: the model has no FlatLoraLinear layers (call apply_flat_lora first)")
    rslora = {layer.use_rslora for _, layer in layers}
    if len(rslora) != 1:
        raise ValueError("save_peft_adapter: layers mix use_rslora=True and False, which one LoraConfig cannot hold")
    use_rslora = rslora.pop()
    for name, layer in layers:
        expected = _peft_scaling(layer.r, layer.lora_alpha, use_rslora)
        if not math.isclose(layer.scaling, expected, rel_tol=1e-12):
            raise ValueError(
                f"save_peft_adapter: layer {name!r} has scaling {layer.scaling}, but PEFT would use {expected} "
                f"from r={layer.r}, lora_alpha={layer.lora_alpha}"
            )
    r = Counter(layer.r for _, layer in layers).most_common(1)[0][0]
    alpha = Counter(layer.lora_alpha for _, layer in layers).most_common(1)[0][0]
    dropout = Counter(layer.lora_dropout_p for _, layer in layers).most_common(1)[0][0]
    conv1d = {layer.fan_in_fan_out for _, layer in layers}
    heads = modules_to_save_of(model)
    name_or_path = getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", None) or None
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        target_modules=[name for name, _ in layers],
        rank_pattern={name: layer.r for name, layer in layers if layer.r != r},
        alpha_pattern={name: layer.lora_alpha for name, layer in layers if layer.lora_alpha != alpha},
        fan_in_fan_out=conv1d == {True},  # PEFT flips it per layer for a mixed model (with a warning)
        modules_to_save=heads or None,
        bias="none",
        base_model_name_or_path=name_or_path,
        inference_mode=True,
    )
    tensors = {}
    for name, layer in layers:
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = _cpu(layer.lora_A)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = _cpu(layer.lora_B)
    tensors.update(_head_tensors(model, heads, _PREFIX))
    os.makedirs(save_directory, exist_ok=True)
    config.save_pretrained(save_directory)
    save_file(tensors, os.path.join(save_directory, _WEIGHTS), metadata={"format": "pt"})


@torch.no_grad()
def load_peft_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a PEFT LoRA directory into a model converted by ``apply_flat_lora`` (in place); returns it.

    The directory must cover exactly the model's Flat-LoRA layers with the same ranks and scales.
    """
    from safetensors.torch import load_file

    config_path = os.path.join(directory, _CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_peft_adapter: {config_path} not found (not a PEFT adapter directory)")
    with open(config_path) as handle:
        config = json.load(handle)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_peft_adapter: {directory} holds a {config.get('peft_type')} adapter, not LORA")
    if config.get("use_dora"):
        raise ValueError(f"load_peft_adapter: {directory} is a DoRA adapter, which Flat-LoRA layers do not compute")
    tensors = load_file(os.path.join(directory, _WEIGHTS))
    layers = dict(flat_lora_layers(model))
    saved = {key[len(_PREFIX) : -len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")}
    _check_same_layers("load_peft_adapter", directory, saved, layers)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for name, layer in layers.items():
        r = next((v for k, v in rank_pattern.items() if name == k or name.endswith("." + k)), config["r"])
        alpha = next((v for k, v in alpha_pattern.items() if name == k or name.endswith("." + k)), config["lora_alpha"])
        expected = _peft_scaling(r, alpha, bool(config.get("use_rslora")))
        if r != layer.r or not math.isclose(expected, layer.scaling, rel_tol=1e-12):
            raise ValueError(
                f"load_peft_adapter: layer {name!r} is r={r}, scaling={expected} in {directory}; the model has "
                f"r={layer.r}, scaling={layer.scaling}"
            )
        _copy_factors("load_peft_adapter", directory, name, layer, lambda attr: tensors[f"{_PREFIX}{name}.{attr}.weight"])
    _load_heads(model, config.get("modules_to_save") or [], tensors.__getitem__, _PREFIX)
    return model


# --- this package's one-file format ---------------------------------------------------------------


_LAYER_CONFIG = ("r", "lora_alpha", "use_rslora", "scaling", "sigma")  # a file's layer must match all but sigma


def _layer_config(layer) -> dict:
    return {key: getattr(layer, key) for key in _LAYER_CONFIG}


def save_adapter(model: nn.Module, path: str, schedule=None) -> None:
    """Write the LoRA factors (and, if given, the schedule's state) to a safetensors file."""
    from safetensors.torch import save_file

    layers = flat_lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no FlatLoraLinear layers")
    tensors, config = {}, {}
    for name, layer in layers:
        tensors[f"{name}.lora_A"] = _cpu(layer.lora_A)
        tensors[f"{name}.lora_B"] = _cpu(layer.lora_B)
        config[name] = _layer_config(layer)
    heads = modules_to_save_of(model)
    tensors.update(_head_tensors(model, heads))
    metadata = {_METADATA_LAYERS: json.dumps(config), _METADATA_HEADS: json.dumps(heads)}
    if schedule is not None:
        metadata[_METADATA_SCHEDULE] = json.dumps(schedule.state_dict())
    save_file(tensors, path, metadata=metadata)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str, schedule=None) -> nn.Module:
    """Load LoRA factors saved by ``save_adapter`` into ``model`` (in place: Parameters keep their identity).

    The file must cover exactly the model's Flat-LoRA layers, with the same ranks and scalings. When
    ``schedule`` is given and the file holds a schedule state, the schedule resumes from it.
    """
    from safetensors import safe_open

    layers = dict(flat_lora_layers(model))
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if _METADATA_LAYERS not in metadata:
            raise ValueError(f"load_adapter: {path} is not a Flat-LoRA adapter file (no '{_METADATA_LAYERS}' metadata)")
        saved_config = json.loads(metadata[_METADATA_LAYERS])
        _check_same_layers("load_adapter", path, set(saved_config), layers)
        for name, layer in layers.items():
            saved, mine = saved_config[name], _layer_config(layer)
            if any(saved[key] != mine[key] for key in _LAYER_CONFIG if key != "sigma"):
                raise ValueError(f"load_adapter: layer {name!r} was saved with {saved}, the model has {mine}")
            _copy_factors("load_adapter", path, name, layer, lambda attr: handle.get_tensor(f"{name}.{attr}"))
        _load_heads(model, json.loads(metadata.get(_METADATA_HEADS, "[]")), handle.get_tensor)
    if schedule is not None and _METADATA_SCHEDULE in metadata:
        schedule.load_state_dict(json.loads(metadata[_METADATA_SCHEDULE]))
    return model
