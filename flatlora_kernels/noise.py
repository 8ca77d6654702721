"""The Flat-LoRA noise stream: its one definition, and its plain-PyTorch reference.

Every backend (this reference, the C++ CPU code in ``csrc/``, the Triton kernels in
``flatlora_kernels/kernels/``) must produce exactly the stream defined here. Nothing about it
depends on tile sizes, chunk sizes, strategies, devices or backends.

Definition
----------
For a frozen weight ``W: [N, K]`` (N = out_features, K = in_features), LoRA factors
``A: [r, K]``, ``B: [N, r]`` and scaling ``s``::

    W'        = W + s * B @ A                           (in fp32; in fp64 when W, A or B is fp64)
    row_scale = sigma * fp32(||W'[i, :]||_2) / sqrt(K)  (the norm in W''s precision, rounded once to
                                                         fp32; the product and quotient in fp32)
    eps[i, j] = row_scale[i] * z(seed, i, j)

``eps`` is a constant of the step: no gradient flows through it (nor through ``row_scale``), as in
the paper's code, where the noise is drawn under ``no_grad``.

``z(seed, i, j)`` is a standard normal taken from Triton's Philox4x32-10 stream
(``tl.randn4x(seed, offset)``, 10 rounds), with this **row-quarter counter layout**::

    Kq      = ceil(K / 4)             # Philox calls per row
    lane    = j // Kq                 # which of the call's 4 normals (0..3)
    offset  = i * Kq + (j - lane*Kq)  # int64; Philox counter = (lo32(offset), hi32(offset), 0, 0)
    key     = (lo32(seed), hi32(seed))   # seed's 64 bits, two's complement
    z(seed, i, j) = randn4x(seed, offset)[lane]

so one Philox call feeds columns ``c, c + Kq, c + 2Kq, c + 3Kq`` of the same row (columns past K are
dropped). A kernel that walks ``c`` over a row gets four contiguous column strips per call, with no
shuffling between lanes, on any tile or SIMD width: this is why the layout was chosen. Row chunks
``[i0, i1)`` are always made of whole calls.

The normals of one call are Box-Muller pairs, with Triton's uniform mapping and clamp (``u`` is
``uniform_from_bits`` below, ``BoxMuller`` is ``box_muller``)::

    (c0, c1, c2, c3) = Philox4x32_10(counter, key)
    u(x)  = fp32(x') * fp32(4.6566127342e-10), x' = int32(x) if int32(x) >= 0 else -int32(x) - 1
    (z0, z1) = BoxMuller(u(c0), u(c1));  (z2, z3) = BoxMuller(u(c2), u(c3))
    BoxMuller(u1, u2) = (r cos th, r sin th), r = sqrt(-2 log max(u1, 1e-7)), th = 2 pi u2

This is the exact (real-number) definition; each backend rounds it differently. The Philox integers
are bit-exact across backends; the fp32 normals agree to a few ulps (libm vs libdevice log/cos/sin,
fused multiply-adds; the Triton tile takes a correctly rounded sqrt where ``tl.randn4x`` takes
sm_90's approximate one), bounded in tests by ``kernels/noise_tile.MAX_ULPS_FROM_DEFINITION``.

This reference evaluates ``BoxMuller`` in float64 from the (exact) fp32 uniforms and rounds once to
fp32, in row-major slabs small enough that PyTorch runs each elementwise op in the calling thread.
Its fp32 result is then within one ulp of the exact value and does not depend on the number of
threads, on which thread ran a slab, on machine load or on where a vector loop's tail falls (fp32
``torch.log/cos/sin`` on OpenMP worker threads do: docs/DESIGN.md, section 2). The reference stream
is bit-reproducible for a given PyTorch build and CPU.

Expert stacks (3-D parameters)
------------------------------
A mixture-of-experts parameter holds ``E`` experts' weights in one tensor. Read expert ``e`` as
``W_e: [N, K]`` (N = out, K = in: which stored axes these are is the model's layout,
``flatlora_kernels.experts.layout``), with its own factors ``A_e: [r, K]``, ``B_e: [N, r]``. Each
expert is its own weight and each of its rows a filter, with its own row norm; the stack is the
stream of one ``[E*N, K]`` layer, expert ``e``'s row ``i`` being stream row ``e*N + i``::

    row_scale[e, i] = sigma * fp32(||(W_e + s * B_e @ A_e)[i, :]||_2) / sqrt(K)   (as above)
    eps[e, i, j]    = row_scale[e, i] * z(seed, e*N + i, j)

so no two experts share a counter, and each targeted parameter, one layer of the schedule, has its
own seed per optimizer step. ``expert_filter_noise`` materialises it.

The seed is a Python int in ``[0, 2**63)`` or a 0-dim int64 tensor (preferred on GPU: no recompiles,
no host sync). ``sigma = 0`` gives exactly LoRA.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import scalar_tensor

__all__ = [
    "PHILOX_ROUNDS",
    "counters_per_row",
    "philox4x32_10",
    "uniform_from_bits",
    "box_muller",
    "normal_rows",
    "normal_submatrix",
    "merge_dtype",
    "merged_weight",
    "perturbation_row_scale",
    "filter_noise",
    "expert_filter_noise",
]

PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53  # multiplies c0
_ROUND_B = 0xCD9E8D57  # multiplies c2
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586


def counters_per_row(in_features: int) -> int:
    """Philox calls per weight row: ``Kq = ceil(K / 4)``."""
    return (in_features + 3) // 4


def _mulhilo32(a: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product ``a * x`` for ``x`` in [0, 2^32), in int64."""
    # Split x into 16-bit halves so that no int64 product overflows (every term < 2^49).
    x_hi, x_lo = x >> 16, x & 0xFFFF
    p_hi, p_lo = x_hi * a, x_lo * a
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(seed: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 at counter ``(lo32(offset), hi32(offset), 0, 0)``, key ``(lo32(seed), hi32(seed))``: four
    uint32 outputs (held in int64) per offset, as the kernels' ``philox_words`` (and, on triton 3.6-3.9,
    ``tl.randint4x`` on int64 offsets) compute them."""
    seed = seed.to(torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = offset & _MASK32
    c1 = (offset >> 32) & _MASK32
    c2 = torch.zeros_like(offset)
    c3 = torch.zeros_like(offset)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_from_bits(x: Tensor) -> Tensor:
    """The definition's ``u(x)``: fp32 uniforms in [0, 1) from Philox words (uint32 held in int64)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    """The definition's ``BoxMuller(u1, u2)`` of fp32 uniforms, evaluated in float64 and rounded once to fp32."""
    u1 = torch.clamp_min(u1, 1.0e-7).double()  # the clamp is the fp32 one of the definition
    theta = (torch.tensor(_TWO_PI, dtype=torch.float32) * u2).double()  # th rounded to fp32, as Triton's
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return (radius * torch.cos(theta)).float(), (radius * torch.sin(theta)).float()


# Elementwise ops below this many elements run in the calling thread (ATen's GRAIN_SIZE is 32768):
# slabs of this size keep the transcendental math off the OpenMP workers, whose fp32 results depend on load.
_SERIAL_ELEMENTS = 16384


def _normals_from_words(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> list[Tensor]:
    """The four lanes' normals of Philox outputs ``[rows, Kq]``; on CPU, slab by slab in this thread."""
    if c0.device.type != "cpu" or c0.numel() <= _SERIAL_ELEMENTS:
        return [*box_muller(uniform_from_bits(c0), uniform_from_bits(c1)),
                *box_muller(uniform_from_bits(c2), uniform_from_bits(c3))]
    words = [c.reshape(-1) for c in (c0, c1, c2, c3)]
    lanes = [torch.empty(c0.numel(), dtype=torch.float32) for _ in range(4)]
    for start in range(0, c0.numel(), _SERIAL_ELEMENTS):
        part = slice(start, start + _SERIAL_ELEMENTS)
        for lane, z in zip(lanes, _normals_from_words(*(w[part] for w in words))):
            lane[part] = z
    return [lane.view(c0.shape) for lane in lanes]


def normal_rows(
    seed: int | Tensor,
    in_features: int,
    row_start: int,
    row_end: int,
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``z(seed, i, j)`` for rows ``[row_start, row_end)`` and all ``in_features`` columns (fp32)."""
    device = torch.device(device)
    kq = counters_per_row(in_features)
    rows = torch.arange(row_start, row_end, device=device, dtype=torch.int64)
    offsets = rows[:, None] * kq + torch.arange(kq, device=device, dtype=torch.int64)[None, :]
    lanes = _normals_from_words(*philox4x32_10(scalar_tensor(seed, torch.int64, device), offsets))
    # Lane t covers columns [t*Kq, (t+1)*Kq): concatenating the lanes lays the row out in order.
    return torch.cat(lanes, dim=1)[:, :in_features]


def normal_submatrix(
    seed: int | Tensor,
    in_features: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    *,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``z(seed, i, j)`` for global rows ``[i0, i1)`` and columns ``[j0, j1)`` of a ``K = in_features``
    layer (fp32): a shard's piece of the stream, equal to ``normal_rows(...)[:, j0:j1]``."""
    device = torch.device(device)
    kq = counters_per_row(in_features)
    i = torch.arange(*rows, device=device, dtype=torch.int64)
    j = torch.arange(*cols, device=device, dtype=torch.int64)
    lane = j // kq  # which of a call's four normals holds column j
    offsets = i[:, None] * kq + (j - lane * kq)[None, :]
    lanes = torch.stack(_normals_from_words(*philox4x32_10(scalar_tensor(seed, torch.int64, device), offsets)))
    return lanes.gather(0, lane.expand(len(i), len(j))[None]).squeeze(0)


def merge_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype ``W + s*B@A`` is formed in: fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def merged_weight(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype | None = None
) -> Tensor:
    """``W + s*B@A`` (``[N, K]``, no noise) in ``dtype`` (default ``merge_dtype(W, A, B)``): the one place
    outside the kernels where the merged weight is written out (noise row norms, merging, shards)."""
    dtype = dtype or merge_dtype(weight, lora_A, lora_B)
    return weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype))


def perturbation_row_scale(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, *, scaling: float, sigma: float | Tensor
) -> Tensor:
    """``sigma * ||W + s*B@A||_row / sqrt(K)`` in fp32, shape ``[N]`` (forms ``B@A`` whole: reference only)."""
    with torch.no_grad():
        norms = torch.linalg.vector_norm(merged_weight(weight, lora_A, lora_B, scaling), dim=1).float()
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=weight.device)
        return sigma_t * norms / math.sqrt(weight.shape[1])


def filter_noise(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    scaling: float,
    sigma: float | Tensor,
    seed: int | Tensor,
) -> Tensor:
    """Materialise ``eps`` (fp32, the weight's shape) exactly as the kernels regenerate it.

    For tests and debugging only: training paths never call this, they regenerate eps in place.
    """
    from ._validation import check_seed, check_sigma, check_weights

    check_weights(weight, lora_A, lora_B)
    check_sigma(sigma)
    check_seed(seed)
    out_features, in_features = weight.shape
    with torch.no_grad():
        scale = perturbation_row_scale(weight, lora_A, lora_B, scaling=scaling, sigma=sigma)
        z = normal_rows(seed, in_features, 0, out_features, device=weight.device)
        return scale[:, None] * z


def expert_filter_noise(weight: Tensor, lora_A: Tensor, lora_B: Tensor, *, scaling: float, sigma: float | Tensor,
                        seed: int | Tensor) -> Tensor:  # fmt: skip
    """``eps`` of an expert stack (fp32 ``[E, N, K]``): ``weight: [E, N, K]`` read out x in,
    ``lora_A: [E, r, K]``, ``lora_B: [E, N, r]``. For tests and debugging only, like ``filter_noise``."""
    experts, out_features, in_features = weight.shape
    with torch.no_grad():
        scales = torch.stack([
            perturbation_row_scale(weight[e], lora_A[e], lora_B[e], scaling=scaling, sigma=sigma) for e in range(experts)
        ])  # fmt: skip
        z = normal_rows(seed, in_features, 0, experts * out_features, device=weight.device)
        return scales[..., None] * z.view(experts, out_features, in_features)
