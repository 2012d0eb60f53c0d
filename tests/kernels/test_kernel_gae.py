"""kernels/gae.py (GAE scan, masked whitening) against the reference (interpreter on CPU, compiled on CUDA).

Under the interpreter the scan runs element by element in Python (~0.1 ms per element):
shapes here stay small, and `small_blocks` forces several blocks per row instead.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (see kernel_utils)
pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastppo import ops, reference  # noqa: E402
from fastppo.kernels import _launch  # noqa: E402
from fastppo.kernels import gae as gae_module  # noqa: E402
from fastppo.kernels.gae import gae, masked_whiten  # noqa: E402
from kernel_utils import kernels_can_run, spy_on  # noqa: E402,F401 (kernels_can_run: autouse fixture)
from kernel_utils import (  # noqa: E402
    DEVICE, ON_GPU, assert_within_twice_reference_error)
from tolerances import tol  # noqa: E402

MASK_DTYPES = [torch.bool, torch.int32, torch.float32]


pytestmark = [
    # the interpreter evaluates both sides of tl.where in numpy, and empty masks divide 0 by 0 on purpose
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]





def _mask(B, T, generator, dtype=torch.bool):
    """Right-padded responses after a prompt, a hole in the middle of row 0, row 1 empty (when B > 1)."""
    starts = torch.randint(0, max(T // 3, 1), (B,), generator=generator)
    ends = torch.randint(1, T + 1, (B,), generator=generator).maximum(starts + 1)
    positions = torch.arange(T)
    mask = (positions >= starts[:, None]) & (positions < ends[:, None])
    if T > 4:
        mask[0, T // 2] = False
    if B > 1:
        mask[1] = False
    return mask.to(dtype).to(DEVICE)


def _inputs(B, T, seed=0, dtype=torch.float32, mask_dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    return rewards.to(dtype).to(DEVICE), values.to(dtype).to(DEVICE), _mask(B, T, g, mask_dtype)


def _check_gae(rewards, values, mask, gamma, lam):
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected = reference.gae(rewards, values, mask, gamma, lam)
    assert advantages.dtype == returns.dtype == torch.float32
    # same inputs on both sides, float32 math on both: float32 tolerance whatever the input dtype
    torch.testing.assert_close(advantages, expected[0], **tol(torch.float32))
    torch.testing.assert_close(returns, expected[1], **tol(torch.float32))


@pytest.fixture()
def small_blocks(monkeypatch):
    """Several scan blocks per row, two rows per program (as on a GPU), several tiles per whitening program."""
    monkeypatch.setattr(_launch, "MAX_TOKEN_BLOCK_T", 8)
    monkeypatch.setattr(_launch, "INTERPRETER_TOKEN_TILE", 16)
    monkeypatch.setattr(_launch, "GPU_TOKEN_TILE", 16)
    monkeypatch.setattr(_launch, "MAX_TOKEN_PARTIALS", 3)
    # the interpreter's GAE normally gets one row per program; scan a [2, BLOCK_T] tile as a GPU does
    monkeypatch.setattr(gae_module, "token_tiles", lambda B, T, device, scan=False: _launch.token_tiles(B, T, device))


# --------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.0, 0.7), (0.9, 0.0), (0.5, 1.0), (1.0, 0.0)])
def test_gae_matches_reference(gamma, lam):
    _check_gae(*_inputs(4, 21), gamma, lam)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_gae_dtypes(dtype, mask_dtype):
    _check_gae(*_inputs(3, 13, seed=1, dtype=dtype, mask_dtype=mask_dtype), 0.97, 0.9)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (2, 2)])
def test_gae_tiny_shapes(shape):
    _check_gae(*_inputs(*shape, seed=2), 0.9, 0.8)


@pytest.mark.parametrize("block_t", [1, 8])
def test_gae_carries_across_blocks(monkeypatch, small_blocks, block_t):
    monkeypatch.setattr(_launch, "MAX_TOKEN_BLOCK_T", block_t)
    T = 29 if block_t == 8 else 6  # 4 blocks, the leftmost partial; or one position per block
    _check_gae(*_inputs(3, T, seed=3), 0.95, 0.9)
    _check_gae(*_inputs(3, T, seed=3), 1.0, 1.0)


def test_gae_non_contiguous_inputs():
    rewards, values, mask = _inputs(3, 12, seed=4)
    rewards = rewards[:, 1:]  # column slice
    values = values[:, :-1].t().contiguous().t()  # column-major
    mask = mask[:, 1:]
    assert not rewards.is_contiguous() and not values.is_contiguous()
    _check_gae(rewards, values, mask, 0.99, 0.95)


def test_gae_ignores_off_mask_values():
    """Off-mask entries are multiplied by 0 as in the reference: finite garbage there changes nothing."""
    rewards, values, mask = _inputs(2, 9, seed=5)
    mask = mask.bool()
    dirty_values = torch.where(mask, values, torch.full_like(values, 1e6))
    _check_gae(rewards, dirty_values, mask, 0.9, 0.95)
    clean = gae(rewards, values * mask, mask, 0.9, 0.95)
    torch.testing.assert_close(gae(rewards, dirty_values, mask, 0.9, 0.95), clean)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4), T=st.integers(1, 24), block_t=st.sampled_from([2, 8, 2048]),
    gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
)
def test_gae_property(B, T, block_t, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=g).to(DEVICE), torch.randn(B, T, generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(DEVICE)
    saved = _launch.MAX_TOKEN_BLOCK_T
    _launch.MAX_TOKEN_BLOCK_T = block_t  # not monkeypatch: hypothesis reruns the body per example
    try:
        _check_gae(rewards, values, mask, gamma, lam)
    finally:
        _launch.MAX_TOKEN_BLOCK_T = saved


def test_ops_dispatches_gae_and_whiten_to_the_kernels(monkeypatch):
    gae_calls = spy_on(monkeypatch, gae_module, "gae")
    whiten_calls = spy_on(monkeypatch, gae_module, "masked_whiten")
    rewards, values, mask = _inputs(2, 6, seed=6)
    for _ in range(2):  # the second lookup too (a submodule named like its op can shadow it)
        advantages, _ = ops.gae(rewards, values, mask, 0.9, 0.9, backend="triton")
        whitened = ops.masked_whiten(values, mask, backend="triton")
    torch.testing.assert_close(advantages, reference.gae(rewards, values, mask, 0.9, 0.9)[0], **tol(torch.float32))
    torch.testing.assert_close(whitened, reference.masked_whiten(values, mask), **tol(torch.float32))
    assert len(gae_calls) == len(whiten_calls) == 2


# --------------------------------------------------------------------------- masked whitening


def _gae64(rewards, values, mask, gamma, lam):
    """The reference loop in float64 (reference.gae itself computes in float32)."""
    maskd = mask.double()
    rewards, values = rewards.double() * maskd, values.double() * maskd
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def _whiten64(values, mask, shift_mean=True):
    """reference.masked_whiten in float64 (the reference itself computes in float32)."""
    x, m = values.double(), mask.double()
    n = m.sum()
    mean = (x * m).sum() / n
    var = ((x - mean).square() * m).sum() / (n - 1 if n > 1 else n)
    out = (x - mean) / torch.sqrt(var + 1e-8)
    return out if shift_mean else out + mean


def _check_whiten(values, mask, shift_mean=True):
    out = masked_whiten(values, mask, shift_mean)
    assert out.dtype == torch.float32 and out.shape == values.shape
    torch.testing.assert_close(out, reference.masked_whiten(values, mask, shift_mean), **tol(torch.float32),
                               equal_nan=True)
    return out


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_whiten_matches_reference(shift_mean, dtype, mask_dtype):
    _, values, mask = _inputs(5, 37, seed=7, dtype=dtype, mask_dtype=mask_dtype)
    _check_whiten(values, mask, shift_mean)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_several_tiles_and_partials(small_blocks, shift_mean):
    _, values, mask = _inputs(7, 50, seed=8)  # 2-row × 8-column tiles, 28 tiles over 3 programs
    _check_whiten(values, mask, shift_mean)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_single_masked_position(shift_mean):
    _, values, _ = _inputs(3, 5, seed=9)
    mask = torch.zeros(3, 5, dtype=torch.bool, device=DEVICE)
    mask[1, 2] = True  # variance 0 (not Bessel-corrected): out = (x − x[1, 2])·1e4
    out = _check_whiten(values, mask, shift_mean)
    assert out[1, 2] == (values[1, 2] if not shift_mean else 0.0)


def test_whiten_empty_mask_is_nan_like_the_reference():
    _, values, mask = _inputs(2, 5, seed=10)
    out = _check_whiten(values, torch.zeros_like(mask))
    assert out.isnan().all()


def test_whiten_large_offset_is_as_accurate_as_float64_allows(small_blocks):
    """Values ~1e3 + noise: partial (n, mean, M2) merged à la Chan, no E[x²] − E[x]² cancellation."""
    g = torch.Generator().manual_seed(11)
    values = (1e3 + torch.randn(6, 40, generator=g)).to(DEVICE)
    mask = (torch.rand(6, 40, generator=g) > 0.2).to(DEVICE)
    # float32 rounding of a mean near 1e3 alone is ~3e-5 in the output
    assert_within_twice_reference_error(masked_whiten(values, mask), reference.masked_whiten(values, mask),
                                        _whiten64(values, mask), atol=1e-6)
    # and the variance itself: a one-pass float32 E[x²] − E[x]² is 6 % off here
    x = masked_whiten(values, mask, shift_mean=False)
    spread = (x - reference.masked_mean(values, mask))[mask.bool()].double().std()
    assert abs(spread - 1.0) < 1e-3


@pytest.mark.parametrize("shape", [(7,), (2, 3, 5), (1, 1)])
def test_whiten_any_shape(shape):
    g = torch.Generator().manual_seed(12)
    values = torch.randn(shape, generator=g).to(DEVICE)
    mask = (torch.rand(shape, generator=g) > 0.3).to(DEVICE)
    mask.view(-1)[0] = True
    _check_whiten(values, mask)
    _check_whiten(values.transpose(0, -1), mask.transpose(0, -1))  # non-contiguous (a copy when >2-D)


def test_whiten_non_contiguous_2d():
    _, values, mask = _inputs(4, 11, seed=13)
    _check_whiten(values[:, 1:], mask[:, :-1])
    _check_whiten(values.t(), mask.t(), shift_mean=False)


# --------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (1.0, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gae_at_real_shape(gamma, lam, dtype):
    rewards, values, mask = _inputs(64, 8192, seed=14, dtype=dtype)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected64 = _gae64(rewards, values, mask, gamma, lam)
    expected32 = reference.gae(rewards, values, mask, gamma, lam)
    # the scan sums in a tree, the reference loop left to right: compare both to float64
    for got, want32, want64 in zip((advantages, returns), expected32, expected64):
        assert_within_twice_reference_error(got, want32, want64)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("shift_mean", [True, False])
def test_gpu_whiten_at_real_shape(shift_mean):
    _, values, mask = _inputs(64, 8192, seed=15)
    values = values * 3 + 1e3
    assert_within_twice_reference_error(masked_whiten(values, mask, shift_mean),
                                        reference.masked_whiten(values, mask, shift_mean),
                                        _whiten64(values, mask, shift_mean))
