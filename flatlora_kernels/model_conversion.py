"""Whole models: put Flat-LoRA into a model (``apply_flat_lora``), find its layers, merge it back out.

``target_modules`` follows PEFT's conventions:

* a list of names: a module matches when its qualified name equals an entry or ends with
  ``"." + entry`` (``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``);
* a string: a regular expression that must match the whole qualified name;
* ``"all-linear"``: every ``nn.Linear`` (and transformers ``Conv1D``, GPT-2's linear layer; quantized
  ones included, a bitsandbytes 4-bit ``Linear4bit`` converted and others refused by name) except
  the output head: the module returned by ``get_output_embeddings()``, anything named ``lm_head``,
  and a top-level ``classifier`` / ``score`` head (with the Linear layers inside it). Linear layers
  owned by ``nn.MultiheadAttention`` are skipped too, because it reads their weights directly.

Heads (``modules_to_save``, as PEFT's): a top-level ``classifier`` / ``score`` module is a task head
that a pretrained checkpoint does not hold, so by default (``modules_to_save="auto"``) it is trained
in full and stored with the adapter; ``lm_head`` stays frozen. Pass a list of names, or ``[]``, to
choose yourself. The choice is logged and kept in ``model.flatlora_modules_to_save``.

Which layers can be converted is decided by ``flatlora_kernels.layer_support`` (the check every entry
point shares); adapter files: ``flatlora_kernels.peft.adapter_files``.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
from typing import Iterable

import torch
from torch import nn

from .layer_support import base_layer_kind, base_layer_problem, looks_linear, refuse_or_skip
from .modules import FlatLoraLinear
from .step_noise import WarnOnce

__all__ = [
    "apply_flat_lora",
    "flat_lora_layers",
    "merge_flat_lora",
    "unmerge_flat_lora",
    "merge_and_unload",
    "modules_to_save_of",
    "unwrap_model",
    "replace_submodule",
    "build_flat_layer",
]

_HEAD_NAMES = ("classifier", "score")  # top-level classification heads that "all-linear" leaves alone
_log = logging.getLogger("flatlora_kernels")


def build_flat_layer(base: nn.Module, **config) -> FlatLoraLinear:
    """The Flat-LoRA layer that replaces ``base``: its kind's ``flat_layer`` (``layer_support``), else
    ``FlatLoraLinear.from_linear``; ``config`` as ``from_linear``'s keywords."""
    kind = base_layer_kind(base)
    if kind is not None and kind.flat_layer is not None:
        return kind.flat_layer(base, **config)
    return FlatLoraLinear.from_linear(base, **config)


def unwrap_model(model: nn.Module) -> nn.Module:
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
    return [(name, m) for name, m in unwrap_model(model).named_modules() if isinstance(m, FlatLoraLinear)]


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


def _select_targets(model: nn.Module, target_modules, exclude_modules, skip_unsupported: bool) -> list[str]:
    """The names to convert; every candidate the shared layer check refuses is named (or skipped)."""
    mha_owned = _owned_by_multihead_attention(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        skipped = _output_head_names(model) | mha_owned
        candidates = [(n, m) for n, m in model.named_modules() if looks_linear(m) and n not in skipped]
    else:
        _check_spec("target_modules", target_modules)
        candidates = [
            (n, m)
            for n, m in model.named_modules()
            if n and _name_matches(target_modules, n) and not isinstance(m, FlatLoraLinear)
        ]
    if exclude_modules is not None:
        _check_spec("exclude_modules", exclude_modules)
        candidates = [(n, m) for n, m in candidates if not _name_matches(exclude_modules, n)]
    problems = {}
    for name, module in candidates:
        if name in mha_owned:
            problems[name] = "it belongs to nn.MultiheadAttention, which reads its weight directly"
        elif (problem := base_layer_problem(module)) is not None:
            problems[name] = problem
    refuse_or_skip("apply_flat_lora", problems.items(), skip_unsupported)
    targets = [name for name, _ in candidates if name not in problems]
    if not targets:
        linear_names = [n for n, m in model.named_modules() if looks_linear(m)]
        shown = ", ".join(linear_names[:8]) + (", ..." if len(linear_names) > 8 else "")
        raise ValueError(
            f"apply_flat_lora: target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no "
            f"convertible layer; the model's linear layers are: {shown or 'none'}"
        )
    return targets


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
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
    skip_unsupported: bool = False,
    **layer_kwargs,
) -> nn.Module:
    """Swap the matching ``nn.Linear`` / ``Conv1D`` layers of ``model`` for ``FlatLoraLinear`` in place
    (bitsandbytes 4-bit ``Linear4bit`` layers for ``FlatLoraLinear4bit``, sharing the 4-bit base).

    Every parameter of the model is frozen except the new ``lora_A`` / ``lora_B`` and the modules in
    ``modules_to_save`` (by default a top-level ``classifier`` / ``score`` head, trained in full and
    saved with the adapter; see the module docstring). Base weights are shared, not copied.
    ``layer_kwargs`` go to ``FlatLoraLinear.from_linear`` (``lora_dropout``, ``use_rslora``,
    ``lora_dtype``). Returns ``model``. Raises when the model is already converted, and
    ``UnsupportedLayerError`` naming every targeted layer Flat-LoRA cannot run (8-bit or other
    quantized, embedding, ...: ``flatlora_kernels.layer_support``) unless ``skip_unsupported=True``,
    which leaves those layers as they are (frozen) with a warning that names them.

    Then create a ``FlatLoraSchedule(model, total_steps)`` and call ``.step()`` after every optimizer
    step: without it the layers train as plain LoRA.
    """
    public = [p for p in inspect.signature(apply_flat_lora).parameters if p not in ("model", "layer_kwargs")]
    _check_layer_kwargs("apply_flat_lora", layer_kwargs, public)
    inner = unwrap_model(model)
    if flat_lora_layers(inner):
        raise ValueError(
            "apply_flat_lora: the model is already converted (it holds FlatLoraLinear layers); "
            "apply it once, with every target in one call"
        )
    targets = _select_targets(inner, target_modules, exclude_modules, skip_unsupported)
    heads = _resolve_heads(inner, modules_to_save, targets)
    for parameter in inner.parameters():
        parameter.requires_grad_(False)
    warn_once = WarnOnce()  # one no-schedule warning per model
    for name in targets:
        linear = inner.get_submodule(name)
        layer = build_flat_layer(linear, r=r, lora_alpha=lora_alpha, sigma=sigma, fused=fused, **layer_kwargs)
        layer.train(linear.training)
        layer.noise_warning = warn_once
        replace_submodule(inner, name, layer)
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
    return list(getattr(unwrap_model(model), "flatlora_modules_to_save", []))


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
    """Replace every Flat-LoRA layer by a plain ``nn.Linear`` (or ``Conv1D``) holding ``W + s*B@A`` (no copy kept)."""
    inner = unwrap_model(model)
    for name, layer in flat_lora_layers(inner):
        layer.unmerge()
        dtype = layer.weight.dtype
        if layer.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D  # only a Conv1D-based layer gets here

            plain = Conv1D(layer.out_features, layer.in_features).to(device="meta", dtype=dtype)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype)
        plain.weight = nn.Parameter(layer.merged_weight().to(dtype), requires_grad=False)
        plain.bias = layer.bias
        plain.train(layer.training)
        replace_submodule(inner, name, plain)
    return model
