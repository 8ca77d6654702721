"""The bitsandbytes 4-bit weight layout, read without importing bitsandbytes, and its torch decoder.

A ``Linear4bit`` weight of shape ``[N, K]`` (``Params4bit``) is stored as:

* ``codes``: uint8, ``ceil(N*K / 2)`` bytes (bitsandbytes keeps them as ``[N*K/2, 1]``): the weight
  flattened row-major, two 4-bit codes per byte, **the even element in the high nibble**
  (``byte >> 4``), the odd one in the low nibble (``byte & 15``);
* a 16-entry fp32 code table (``quant_state.code``): NF4's normal quantiles or FP4's values;
* one scale per ``blocksize`` consecutive elements of the *flat* weight (blocks run across row
  ends when ``K`` is not a multiple of the blocksize): ``quant_state.absmax``, fp32, or, with double
  quantization (``compress_statistics=True``, ``quant_state.nested``), uint8 codes into a 256-entry
  table ``state2.code``, with fp32 scales ``state2.absmax`` per ``state2.blocksize`` codes and an fp32
  ``offset``: ``absmax[b] = state2.code[u[b]] * state2.absmax[b // state2.blocksize] + offset``.

``deq(W)[e] = dtype(code_table[nibble(e)] * absmax[e // blocksize])``: an fp32 product rounded once to
``quant_state.dtype`` (the dtype the layer was quantized from), as ``bitsandbytes.functional
.dequantize_4bit`` computes it. (bitsandbytes 0.50.2's CPU kernel for that function restarts blocks at
each row when ``K % blocksize != 0``, contrary to its own quantizer and CUDA kernel: there the flat
definition above is the right one, and tests compare with bitsandbytes' default-backend decoder.)

bitsandbytes 0.50 also has a CPU inference layout (``packing_format_for_cpu``: rows interleaved in
blocks of 32, bf16 transposed absmax), made in place by an eval-mode no-grad forward on CPUs with
AVX512-BF16; it is refused (its absmax is rounded to bf16, so it is no longer the trained base).

``Packed4bit`` gathers these tensors (never copies them: they are the base layer's own) for the ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Packed4bit", "is_bnb_4bit", "is_torchao_nf4", "packed_from_torchao_nf4", "expand_absmax", "unpack_codes", "dequantize"]

#: The blocksizes bitsandbytes' 4-bit quantizer accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DEQUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_bnb_4bit(module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (NF4 or FP4; ``LinearNF4`` / ``LinearFP4``
    are subclasses). Duck-typed on the class name so that it needs no bitsandbytes import."""
    return any(cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes") for cls in type(module).__mro__)


@dataclass(frozen=True)
class Packed4bit:
    """One 4-bit weight as the quantized ops take it (the base's own tensors, not copies)."""

    codes: Tensor  #: uint8, flat, ``ceil(N*K/2)``
    absmax: Tensor  #: fp32 ``[blocks]``, or uint8 codes into ``nested_code`` (double quantization)
    code_table: Tensor  #: fp32 ``[16]``
    blocksize: int
    out_features: int
    in_features: int
    dtype: torch.dtype  #: what bitsandbytes dequantizes to (``quant_state.dtype``)
    quant_type: str  #: ``"nf4"`` or ``"fp4"`` (informational: the table is what decodes)
    nested_absmax: Optional[Tensor] = None  #: fp32 scales of the absmax codes (double quantization)
    nested_code: Optional[Tensor] = None  #: fp32 ``[256]`` table of the absmax codes
    nested_blocksize: int = 0
    nested_offset: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def op_args(self) -> tuple:
        """The weight's part of the ``flatlora_q4`` ops' arguments, in their order."""
        return (
            self.codes, self.absmax, self.code_table, self.nested_absmax, self.nested_code, self.blocksize,
            self.nested_blocksize, self.nested_offset, self.dtype, self.out_features, self.in_features,
        )

    @classmethod
    def from_quant_state(cls, codes: Tensor, quant_state, *, name: str = "weight") -> "Packed4bit":
        """From packed codes and a bitsandbytes ``QuantState`` (checked: a bad one raises naming ``name``)."""
        state = quant_state
        if state is None:
            raise ValueError(
                f"{name}: the 4-bit weight has no quant_state (not quantized yet: bitsandbytes quantizes a "
                "Linear4bit when it is moved to a device, e.g. .to('cpu') or .cuda())"
            )
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                f"{name}: bitsandbytes has repacked this 4-bit weight into its CPU inference layout "
                "(packing_format_for_cpu: an eval-mode forward under no_grad on a CPU with AVX512-BF16 does it, "
                "in place), which Flat-QLoRA does not read. Reload the base, or wrap it before any such forward "
                "(the Flat-QLoRA layer's own evaluation forward does not repack it)"
            )
        shape = tuple(state.shape)
        if len(shape) != 2:
            raise ValueError(f"{name}: a 4-bit linear weight must be 2-D, quant_state.shape is {shape}")
        if state.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"{name}: quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
        if state.blocksize not in BLOCKSIZES:
            raise ValueError(f"{name}: blocksize {state.blocksize} is not one of bitsandbytes' {BLOCKSIZES}")
        if state.dtype not in _DEQUANT_DTYPES:
            raise ValueError(f"{name}: quant_state.dtype must be fp32/bf16/fp16, got {state.dtype}")
        n, k = shape
        if codes.dtype != torch.uint8 or codes.numel() != (n * k + 1) // 2:
            raise ValueError(
                f"{name}: packed codes must be {(n * k + 1) // 2} uint8 values for a {n}x{k} weight, got "
                f"{codes.numel()} {codes.dtype}"
            )
        blocks = -(-n * k // state.blocksize)
        if state.absmax.numel() != blocks:
            raise ValueError(f"{name}: absmax has {state.absmax.numel()} entries, {blocks} blocks expected")
        code_table = state.code.to(torch.float32)
        if code_table.numel() != 16:
            raise ValueError(f"{name}: the 4-bit code table must have 16 entries, got {code_table.numel()}")
        nested = dict()
        if state.nested:
            nested_state = state.state2
            if state.absmax.dtype != torch.uint8 or nested_state.code.numel() != 256:
                raise ValueError(f"{name}: double-quantized absmax must be uint8 codes into a 256-entry table")
            nested = dict(
                nested_absmax=nested_state.absmax.to(torch.float32),
                nested_code=nested_state.code.to(torch.float32),
                nested_blocksize=int(nested_state.blocksize),
                nested_offset=float(state.offset),
            )
        elif state.absmax.dtype != torch.float32:
            raise ValueError(f"{name}: absmax must be fp32 (or uint8 when double-quantized), got {state.absmax.dtype}")
        return cls(
            codes=codes.reshape(-1), absmax=state.absmax, code_table=code_table, blocksize=int(state.blocksize),
            out_features=n, in_features=k, dtype=state.dtype, quant_type=state.quant_type, **nested,
        )

    @classmethod
    def from_linear4bit(cls, module, *, name: str | None = None) -> "Packed4bit":
        """The weight of a bitsandbytes ``Linear4bit`` (its tensors, shared)."""
        name = name or type(module).__name__
        if not is_bnb_4bit(module):
            raise TypeError(f"{name}: expected a bitsandbytes Linear4bit, got {type(module).__name__}")
        weight = module.weight
        return cls.from_quant_state(weight.data, getattr(weight, "quant_state", None), name=name)


def is_torchao_nf4(tensor) -> bool:
    """Whether ``tensor`` is a torchao ``NF4Tensor`` (torchtune's QLoRA weights), by class name and module."""
    return any(cls.__name__ == "NF4Tensor" and cls.__module__.startswith("torchao") for cls in type(tensor).__mro__)


def packed_from_torchao_nf4(tensor, *, name: str = "weight") -> Packed4bit:
    """A torchao ``NF4Tensor`` as a ``Packed4bit``: the same packing (flat, high nibble first) and code
    table; its double-quantized scalers (int8 codes divided by a per-block factor, rounded to the
    weight's dtype, plus a mean) are expanded here with torchao's own ``dequantize_scalers``, as fp32
    per-block scales: ``N*K / block_size`` values, a temporary of each call that builds one. The
    decode ``table[c] * scale`` is then exact in fp32 and rounded once to the weight's dtype, which is
    what torchao's own ``get_original_weight`` computes (tested bit for bit)."""
    if not is_torchao_nf4(tensor):
        raise TypeError(f"{name}: expected a torchao NF4Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name}: an NF4 linear weight must be 2-D, got shape {tuple(tensor.shape)}")
    scales = tensor.dequantize_scalers(tensor.quantized_scalers, tensor.quantization_factor, tensor.scaler_block_size)
    n, k = tensor.shape
    return Packed4bit(
        codes=tensor.quantized_data.reshape(-1), absmax=scales.to(torch.float32),
        code_table=tensor.nf4.to(torch.float32), blocksize=int(tensor.block_size), out_features=n, in_features=k,
        dtype=tensor.dtype, quant_type="nf4",
    )


def expand_absmax(
    absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], nested_blocksize: int,
    nested_offset: float,
) -> Tensor:
    """The fp32 per-block scales: ``absmax`` itself, or the double-quantized codes decoded (fp32 product,
    then the fp32 offset added, as bitsandbytes does)."""
    if nested_absmax is None:
        return absmax.to(torch.float32)
    block = torch.arange(absmax.numel(), device=absmax.device) // nested_blocksize
    scales = nested_code[absmax.long()] * nested_absmax[block]
    return scales + torch.tensor(nested_offset, dtype=torch.float32, device=absmax.device)


def unpack_codes(codes: Tensor, numel: int) -> Tensor:
    """The 4-bit codes of the first ``numel`` flat elements (int64): high nibble first."""
    pairs = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1)
    return pairs[:numel].long()


def dequantize(
    codes: Tensor, absmax: Tensor, code_table: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
    blocksize: int, nested_blocksize: int, nested_offset: float, dtype: torch.dtype, out_features: int,
    in_features: int,
) -> Tensor:
    """``deq(W)``: ``[N, K]`` in ``dtype`` (arguments in ``Packed4bit.op_args`` order). Whole-weight:
    for the reference backend and tests only."""
    numel = out_features * in_features
    scales = expand_absmax(absmax, nested_absmax, nested_code, nested_blocksize, nested_offset)
    block = torch.arange(numel, device=codes.device) // blocksize
    values = code_table[unpack_codes(codes, numel)] * scales[block]
    return values.reshape(out_features, in_features).to(dtype)
