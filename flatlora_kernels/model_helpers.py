"""Whole-model helpers: put Flat-LoRA into a model, find its layers, merge them, save the adapter.

``target_modules`` follows PEFT's conventions:

* a list of names: a module matches when its qualified name equals an entry or ends with
  ``"." + entry`` (``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``);
* a string: a regular expression that must match the whole qualified name;
* ``"all-linear"``: every ``nn.Linear`` (and transformers ``Conv1D``, GPT-2's linear layer) except
  the output head: the module returned by ``get_output_embeddings()``, anything named ``lm_head``,
  and a top-level ``classifier`` / ``score`` head (with the Linear layers inside it). Linear layers
  owned by ``nn.MultiheadAttention`` are skipped too, because it reads their weights directly.

Heads (``modules_to_save``, as PEFT's): a top-level ``classifier`` / ``score`` module is a task head
that a pretrained checkpoint does not hold, so by default (``modules_to_save="auto"``) it is trained
in full and stored with the adapter; ``lm_head`` stays frozen. Pass a list of names, or ``[]``, to
choose yourself. The choice is logged and kept in ``model.flatlora_modules_to_save``.

Adapter files are safetensors holding ``<layer name>.lora_A`` / ``.lora_B`` (and the heads' tensors),
with each layer's configuration (and, optionally, the schedule's state) as JSON in the metadata.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import re
from typing import Iterable

import torch
from torch import nn

from .modules import FlatLoraLinear, _is_conv1d

__all__ = [
    "apply_flat_lora",
    "flat_lora_layers",
    "merge_flat_lora",
    "unmerge_flat_lora",
    "merge_and_unload",
    "save_adapter",
    "load_adapter",
    "modules_to_save_of",
]

_HEAD_NAMES = ("classifier", "score")  # top-level classification heads that "all-linear" leaves alone
_METADATA_LAYERS = "flatlora.layers"
_METADATA_SCHEDULE = "flatlora.schedule"
_METADATA_HEADS = "flatlora.modules_to_save"
_log = logging.getLogger("flatlora_kernels")


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


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
        targets = [n for n, m in model.named_modules() if _is_linear(m) and n not in skipped]
    else:
        _check_spec("target_modules", target_modules)
        targets = []
        for name, module in model.named_modules():
            if not name or not _name_matches(target_modules, name):
                continue
            if isinstance(module, FlatLoraLinear):
                continue  # already converted
            if not _is_linear(module) or name in mha_owned:
                why = "it belongs to nn.MultiheadAttention, which reads its weight directly" if name in mha_owned else (
                    f"it is a {type(module).__name__}"
                )
                raise TypeError(
                    f"target_modules matched {name!r}, but Flat-LoRA wraps nn.Linear / Conv1D layers only and {why}"
                )
            targets.append(name)
    if exclude_modules is not None:
        _check_spec("exclude_modules", exclude_modules)
        targets = [n for n in targets if not _name_matches(exclude_modules, n)]
    if not targets:
        linear_names = [n for n, m in model.named_modules() if _is_linear(m)]
        shown = ", ".join(linear_names[:8]) + (", ..." if len(linear_names) > 8 else "")
        raise ValueError(
            f"apply_flat_lora: target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no "
            f"nn.Linear layer; the model's Linear layers are: {shown or 'none'}"
        )
    return targets


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)


_LAYER_KWARGS = ("lora_dropout", "use_rslora", "lora_dtype")


def _check_layer_kwargs(function: str, kwargs: dict, public: Iterable[str]) -> None:
    """A misspelt keyword names the public function and the nearest valid keyword."""
    for key in kwargs:
        if key not in _LAYER_KWARGS:
            valid = list(public) + list(_LAYER_KWARGS)
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keywords: {', '.join(valid)}"
            raise TypeError(f"{function}() got an unexpected keyword argument {key!r}{hint}")


def _resolve_heads(model: nn.Module, modules_to_save, targets: list[str]) -> list[str]:
    if isinstance(modules_to_save, str) and modules_to_save == "auto":
        heads = [attr for attr in _HEAD_NAMES if isinstance(getattr(model, attr, None), nn.Module)]
    elif isinstance(modules_to_save, str) or not all(isinstance(n, str) for n in modules_to_save):
        raise TypeError(f"modules_to_save must be 'auto' or a list of module names, got {modules_to_save!r}")
    else:
        heads = list(modules_to_save)
    names = dict(model.named_modules())
    for head in heads:
        if head not in names:
            raise ValueError(f"apply_flat_lora: modules_to_save names {head!r}, which is not a module of the model")
        clash = [t for t in targets if t == head or t.startswith(head + ".")]
        if clash:
            raise ValueError(f"apply_flat_lora: {head!r} is in modules_to_save and also targeted ({clash[:3]})")
    return heads


def apply_flat_lora(
    model: nn.Module,
    target_modules: str | list[str] = "all-linear",
    r: int = 8,
    lora_alpha: float = 16,
    sigma: float = 0.05,
    fused: bool = True,
    exclude_modules: str | list[str] | None = None,
    modules_to_save: str | list[str] = "auto",
    **layer_kwargs,
) -> nn.Module:
    """Swap the matching ``nn.Linear`` / ``Conv1D`` layers of ``model`` for ``FlatLoraLinear`` in place.

    Every parameter of the model is frozen except the new ``lora_A`` / ``lora_B`` and the modules in
    ``modules_to_save`` (by default a top-level ``classifier`` / ``score`` head, trained in full and
    saved with the adapter; see the module docstring). Base weights are shared, not copied.
    ``layer_kwargs`` go to ``FlatLoraLinear.from_linear`` (``lora_dropout``, ``use_rslora``,
    ``lora_dtype``). Returns ``model``. Raises when the model is already converted.

    Then create a ``FlatLoraSchedule(model, total_steps)`` and call ``.step()`` after every optimizer
    step: without it the layers train as plain LoRA.
    """
    public = [p for p in inspect.signature(apply_flat_lora).parameters if p not in ("model", "layer_kwargs")]
    _check_layer_kwargs("apply_flat_lora", layer_kwargs, public)
    inner = _unwrap(model)
    if flat_lora_layers(inner):
        raise ValueError(
            "apply_flat_lora: the model is already converted (it holds FlatLoraLinear layers); "
            "apply it once, with every target in one call"
        )
    targets = _select_targets(inner, target_modules, exclude_modules)
    heads = _resolve_heads(inner, modules_to_save, targets)
    for parameter in inner.parameters():
        parameter.requires_grad_(False)
    warn_group = {"warned": False}  # one no-schedule warning per model
    for name in targets:
        linear = inner.get_submodule(name)
        layer = FlatLoraLinear.from_linear(linear, r=r, lora_alpha=lora_alpha, sigma=sigma, fused=fused, **layer_kwargs)
        layer.train(linear.training)
        layer._warn_group = warn_group
        _replace_submodule(inner, name, layer)
    for head in heads:
        inner.get_submodule(head).requires_grad_(True)
    inner.flatlora_modules_to_save = heads
    _log.info(
        "apply_flat_lora: %d layers converted; trained in full and saved with the adapter (modules_to_save): %s; "
        "frozen output head: %s",
        len(targets),
        heads or "none",
        "lm_head" if hasattr(inner, "lm_head") else "none",
    )
    return model


def modules_to_save_of(model: nn.Module) -> list[str]:
    """The heads ``apply_flat_lora`` trains in full and saves with the adapter."""
    return list(getattr(_unwrap(model), "flatlora_modules_to_save", []))


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
        delta = layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())
        if layer.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D  # only a Conv1D-based layer gets here

            linear = Conv1D(layer.out_features, layer.in_features).to(device="meta", dtype=weight.dtype)
            delta = delta.t()
        else:
            linear = nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=weight.dtype
            )
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
    heads = modules_to_save_of(model)
    for head in heads:
        for key, tensor in _unwrap(model).get_submodule(head).state_dict().items():
            tensors[f"{head}.{key}"] = tensor.detach().cpu().contiguous()
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
        for head in json.loads(metadata.get(_METADATA_HEADS, "[]")):
            module = _unwrap(model).get_submodule(head)
            module.load_state_dict({key: handle.get_tensor(f"{head}.{key}") for key in module.state_dict()})
    if schedule is not None and _METADATA_SCHEDULE in metadata:
        schedule.load_state_dict(json.loads(metadata[_METADATA_SCHEDULE]))
    return model
