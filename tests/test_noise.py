"""The noise stream: bit-exact with Triton's Philox, the documented layout, and the right statistics."""

import math
import os

import pytest
import torch

from flatlora_kernels import filter_noise
from flatlora_kernels.noise import counters_per_row, normal_rows, perturbation_row_scale, philox4x32_10

from .conftest import make_layer

SEEDS = [0, 1, 16, 12345, 2**40 + 7, 2**63 - 1]


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRETING:  # a module-level kernel: the interpreter resolves a kernel's names in its module
    import triton
    import triton.language as tl

    from flatlora_kernels.kernels.noise_tile import philox_words

    @triton.jit
    def _words_kernel(seed_ptr, offset_ptr, out_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        c0, c1, c2, c3 = philox_words(tl.load(seed_ptr), tl.load(offset_ptr + idx, mask=mask))
        for lane, c in enumerate((c0, c1, c2, c3)):
            tl.store(out_ptr + idx * 4 + lane, c.to(tl.int64) & 0xFFFFFFFF, mask=mask)


@pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", SEEDS + [-5])
def test_philox_integers_match_the_kernels_philox_words(seed):
    """The kernels' ``philox_words`` (counter words built explicitly, not by ``tl.randint4x``, whose int64
    handling differs across Triton releases: triton 3.2 runs Philox4x64 on int64 offsets) against the
    reference ``philox4x32_10``."""
    # Offsets around 2^32 exercise the counter's high word.
    offsets = torch.cat([torch.arange(300), torch.arange(2**32 - 100, 2**32 + 100), torch.tensor([2**45 + 3])])
    seed_t = torch.tensor(seed, dtype=torch.int64)
    out = torch.empty(offsets.numel() * 4, dtype=torch.int64)
    _words_kernel[(triton.cdiv(offsets.numel(), 256),)](seed_t, offsets, out, offsets.numel(), BLOCK=256)
    expected = torch.stack(philox4x32_10(seed_t, offsets), dim=1).reshape(-1)
    assert torch.equal(out, expected)


def test_layout_is_row_quarter_counters():
    """z(seed, i, j) = randn4x(seed, i*Kq + j mod Kq)[j div Kq], written out by hand for a few (i, j)."""
    from flatlora_kernels.noise import box_muller, uniform_from_bits

    seed, K = 99, 13
    kq = counters_per_row(K)
    assert kq == 4
    z = normal_rows(seed, K, 0, 5)
    for i, j in [(0, 0), (0, 4), (1, 5), (3, 12), (4, 9)]:
        lane, c = divmod(j, kq)
        c0, c1, c2, c3 = philox4x32_10(torch.tensor(seed), torch.tensor([i * kq + c]))
        u = [uniform_from_bits(word) for word in (c0, c1, c2, c3)]
        pair = box_muller(u[0], u[1]) + box_muller(u[2], u[3])
        assert z[i, j] == pair[lane][0]


@pytest.mark.parametrize("K", [1, 2, 3, 5, 8, 13, 100])
def test_row_chunks_are_slices_of_the_whole(K):
    whole = normal_rows(7, K, 0, 11)
    assert whole.shape == (11, K)
    assert torch.equal(normal_rows(7, K, 3, 8), whole[3:8])


def test_int_and_tensor_seeds_agree_and_seeds_differ():
    a = normal_rows(5, 64, 0, 4)
    assert torch.equal(a, normal_rows(torch.tensor(5), 64, 0, 4))
    assert not torch.equal(a, normal_rows(6, 64, 0, 4))


def test_filter_noise_row_std_matches_definition():
    N, K, r, sigma, s = 48, 4096, 8, 0.1, 2.0
    W, A, B, _ = make_layer(N, K, r)
    W = W * torch.linspace(0.2, 3.0, N)[:, None]  # rows of very different norms
    eps = filter_noise(W, A, B, scaling=s, sigma=sigma, seed=3)
    assert eps.dtype == torch.float32 and eps.shape == (N, K)
    expected_std = sigma * torch.linalg.vector_norm(W + s * B @ A, dim=1) / math.sqrt(K)
    row_std = eps.std(dim=1)
    # Sample std of 4096 normals has relative error ~1/sqrt(2*4096) = 1.1%: allow 5 sigma.
    assert torch.allclose(row_std, expected_std, rtol=0.06)
    assert (eps.mean(dim=1).abs() < 5 * expected_std / math.sqrt(K)).all()
    assert torch.allclose(perturbation_row_scale(W, A, B, scaling=s, sigma=sigma), expected_std, rtol=1e-5)


def test_normals_are_standard_normal_and_uncorrelated():
    z = normal_rows(11, 1001, 0, 400)  # odd K: every lane and the ragged tail are in play
    flat = z.flatten().double()
    n = flat.numel()
    assert abs(flat.mean()) < 5 / math.sqrt(n)
    assert abs(flat.var() - 1) < 5 * math.sqrt(2 / n)
    # Kolmogorov-Smirnov distance against N(0, 1): 1.63/sqrt(n) is the 1% critical value.
    sorted_z = flat.sort().values
    cdf = 0.5 * (1 + torch.erf(sorted_z / math.sqrt(2)))
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - ecdf).abs().max() < 1.63 / math.sqrt(n)
    assert abs(((flat**4).mean() - 3)) < 0.05  # kurtosis of a normal
    # Neighbouring rows, the four lanes of one call, and another seed: no correlation.
    corr = lambda a, b: torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].abs()  # noqa: E731
    bound = 5 / math.sqrt(z[0::2].numel())
    assert corr(z[0::2], z[1::2]) < bound
    kq = counters_per_row(1001)
    assert corr(z[:, :kq - 1], z[:, kq:2 * kq - 1]) < bound
    assert corr(z, normal_rows(12, 1001, 0, 400)) < bound


def test_sigma_zero_gives_zero_noise():
    W, A, B, _ = make_layer(9, 10, 2)
    assert torch.count_nonzero(filter_noise(W, A, B, scaling=1.0, sigma=0.0, seed=1)) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_norms_are_fp32_for_low_precision_weights(dtype):
    W, A, B, _ = make_layer(16, 64, 4, dtype=dtype)
    eps = filter_noise(W, A, B, scaling=2.0, sigma=0.1, seed=0)
    assert eps.dtype == torch.float32
    expected = filter_noise(W.float(), A.float(), B.float(), scaling=2.0, sigma=0.1, seed=0)
    assert torch.equal(eps, expected)


@pytest.mark.parametrize("K", [5, 13, 100])
def test_normal_submatrix_is_a_slice_of_the_rows(K):
    from flatlora_kernels.noise import normal_submatrix

    whole = normal_rows(11, K, 0, 9)
    for cols in [(0, K), (1, K - 1), (K // 4, K // 2 + 1)]:
        assert torch.equal(normal_submatrix(11, K, (2, 7), cols), whole[2:7, cols[0] : cols[1]])
