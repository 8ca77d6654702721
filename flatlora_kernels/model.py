"""Whole-model helpers: put Flat-LoRA into a model, find its layers, merge them, save the adapter.

``target_modules`` follows PEFT's conventions:

* a list of names: a module matches when its qualified name equals an entry or ends with
  ``"." + entry`` (``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``);
* a string: a regular expression that must match the whole qualified name;
* ``"all-linear"``: every ``nn.Linear`` except the output head: the module returned by
  ``get_output_embeddings()``, anything named ``lm_head``, and a top-level ``classifier`` / ``score``
  head (with the Linear layers inside it). Linear layers owned by ``nn.MultiheadAttention`` are
  skipped too, because it reads their weights directly instead of calling them.

Adapter files are safetensors holding only ``<layer name>.lora_A`` / ``.lora_B``, with each layer's
configuration (and, optionally, the schedule's state) as JSON in the metadata.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

import torch
from torch import nn

from .modules import FlatLoraLinear

__all__ = [
    "apply_flat_lora",
    "flat_lora_layers",
    "merge_flat_lora",
    "unmerge_flat_lora",
    "merge_and_unload",
    "save_adapter",
    "load_adapter",
]

_HEAD_NAMES = ("classifier", "score")  # top-level classification heads that "all-linear" leaves alone
_METADATA_LAYERS = "flatlora.layers"
_METADATA_SCHEDULE = "flatlora.schedule"


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers, so names have no prefix."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def flat_lora_layers(model: nn.Module) -> list[tuple[str, FlatLoraLinear]]:
    """``(qualified name, layer)`` for every ``FlatLoraLinear``, in module order."""
    return [(name, m) for name, m in _unwrap(model).named_modules() if isinstance(m, FlatLoraLinear)]


def _name_matches(spec: str | Iterable[str], name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _check_spec(arg: str, spec) -> None:
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as error:
            raise ValueError(f"{arg}={spec!r} is not a valid regular expression: {error}") from None
    elif not all(isinstance(key, str) for key in spec):
        raise TypeError(f"{arg} must be 'all-linear', a regex string or a list of module names, got {spec!r}")


def _output_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head modules and everything inside them."""
    heads = []
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        try:
            heads.append(get_output_embeddings())
        except (NotImplementedError, AttributeError):
            pass
    heads.extend(getattr(model, attr, None) for attr in _HEAD_NAMES)
    head_ids = {id(head) for head in heads if isinstance(head, nn.Module)}
    head_prefixes = [name for name, module in model.named_modules() if id(module) in head_ids]
    names = set()
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last == "lm_head" or any(name == p or name.startswith(p + ".") for p in head_prefixes):
            names.add(name)
    return names


def _owned_by_multihead_attention(model: nn.Module) -> set[str]:
    return {
        f"{parent_name}.{child_name}" if parent_name else child_name
        for parent_name, parent in model.named_modules()
        if isinstance(parent, nn.MultiheadAttention)
        for child_name, _ in parent.named_children()
    }


def _select_targets(model: nn.Module, target_modules, exclude_modules) -> list[str]:
    mha_owned = _owned_by_multihead_attention(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        skipped = _output_head_names(model) | mha_owned
        targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skipped]
    else:
        _check_spec("target_modules", target_modules)
        targets = []
        for name, module in model.named_modules():
            if not name or not _name_matches(target_modules, name):
                continue
            if isinstance(module, FlatLoraLinear):
                continue  # already converted
            if not isinstance(module, nn.Linear) or name in mha_owned:
                why = "it belongs to nn.MultiheadAttention, which reads its weight directly" if name in mha_owned else (
                    f"it is a {type(module).__name__}"
                )
                raise TypeError(f"target_modules matched {name!r}, but Flat-LoRA wraps nn.Linear layers only and {why}")
            targets.append(name)
    if exclude_modules is not None:
        _check_spec("exclude_modules", exclude_modules)
        targets = [n for n in targets if not _name_matches(exclude_modules, n)]
    if not targets:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        shown = ", ".join(linear_names[:8]) + (", ..." if len(linear_names) > 8 else "")
        raise ValueError(
            f"apply_flat_lora: target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no "
            f"nn.Linear layer; the model's Linear layers are: {shown or 'none'}"
        )
    return targets


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)


def apply_flat_lora(
    model: nn.Module,
    target_modules: str | list[str] = "all-linear",
    r: int = 8,
    lora_alpha: float = 16,
    sigma: float = 0.05,
    fused: bool = True,
    exclude_modules: str | list[str] | None = None,
    **layer_kwargs,
) -> nn.Module:
    """Swap the matching ``nn.Linear`` layers of ``model`` for ``FlatLoraLinear`` in place.

    Every parameter of the model is frozen; only the new ``lora_A`` / ``lora_B`` train (unfreeze a
    head yourself if it must train, and save it yourself: adapter files hold LoRA tensors only).
    Base weights are shared with the old layers, not copied. ``layer_kwargs`` go to
    ``FlatLoraLinear.from_linear`` (``lora_dropout``, ``use_rslora``, ``lora_dtype``). Returns ``model``.

    Then create a ``FlatLoraSchedule(model, total_steps)`` and call ``.step()`` after every optimizer
    step: without it the layers train as plain LoRA.
    """
    inner = _unwrap(model)
    targets = _select_targets(inner, target_modules, exclude_modules)
    for parameter in inner.parameters():
        parameter.requires_grad_(False)
    for name in targets:
        linear = inner.get_submodule(name)
        layer = FlatLoraLinear.from_linear(linear, r=r, lora_alpha=lora_alpha, sigma=sigma, fused=fused, **layer_kwargs)
        layer.train(linear.training)
        _replace_submodule(inner, name, layer)
    return model


def merge_flat_lora(model: nn.Module) -> nn.Module:
    """``merge()`` every Flat-LoRA layer (noise-free ``W + s*B@A``; originals kept for ``unmerge``)."""
    for _, layer in flat_lora_layers(model):
        layer.merge()
    return model


def unmerge_flat_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_flat_lora`` exactly (the original weight tensors are put back)."""
    for _, layer in flat_lora_layers(model):
        layer.unmerge()
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every Flat-LoRA layer by a plain ``nn.Linear`` holding ``W + s*B@A`` (no copy kept)."""
    inner = _unwrap(model)
    for name, layer in flat_lora_layers(inner):
        layer.unmerge()
        weight = layer.weight
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=weight.dtype
        )
        delta = layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())
        linear.weight = nn.Parameter((weight.float() + delta).to(weight.dtype), requires_grad=False)
        linear.bias = layer.bias
        linear.train(layer.training)
        _replace_submodule(inner, name, linear)
    return model


def _layer_config(layer: FlatLoraLinear) -> dict:
    return {
        "r": layer.r,
        "lora_alpha": layer.lora_alpha,
        "use_rslora": layer.use_rslora,
        "scaling": layer.scaling,
        "sigma": layer.sigma,
    }


def save_adapter(model: nn.Module, path: str, schedule=None) -> None:
    """Write the LoRA factors (and, if given, the schedule's state) to a safetensors file."""
    from safetensors.torch import save_file

    layers = flat_lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no FlatLoraLinear layers")
    tensors, config = {}, {}
    for name, layer in layers:
        tensors[f"{name}.lora_A"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = layer.lora_B.detach().cpu().contiguous()
        config[name] = _layer_config(layer)
    metadata = {_METADATA_LAYERS: json.dumps(config)}
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
        missing = sorted(set(layers) - set(saved_config))
        unexpected = sorted(set(saved_config) - set(layers))
        if missing or unexpected:
            raise ValueError(
                f"load_adapter: layer names differ between {path} and the model; "
                f"missing from the file: {missing[:5]}, not in the model: {unexpected[:5]}"
            )
        for name, layer in layers.items():
            saved, mine = saved_config[name], _layer_config(layer)
            if any(saved[key] != mine[key] for key in ("r", "lora_alpha", "use_rslora", "scaling")):  # sigma may differ
                raise ValueError(f"load_adapter: layer {name!r} was saved with {saved}, the model has {mine}")
            for attr in ("lora_A", "lora_B"):
                target = getattr(layer, attr)
                tensor = handle.get_tensor(f"{name}.{attr}")
                if tensor.shape != target.shape:
                    raise ValueError(
                        f"load_adapter: {name}.{attr} has shape {tuple(tensor.shape)} in the file, "
                        f"{tuple(target.shape)} in the model"
                    )
                target.copy_(tensor)
    if schedule is not None and _METADATA_SCHEDULE in metadata:
        schedule.load_state_dict(json.loads(metadata[_METADATA_SCHEDULE]))
    return model
