"""kernels/kl_reward.py against reference.kl_penalty_rewards (interpreter on CPU, compiled on CUDA)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (see kernel_utils)
pytest.importorskip("triton")

from fastppo import ops, reference  # noqa: E402
from fastppo.kernels import _launch  # noqa: E402
from fastppo.kernels import kl_reward as kl_reward_module  # noqa: E402
from fastppo.kernels.kl_reward import kl_penalty_rewards  # noqa: E402
from kernel_utils import kernels_can_run, spy_on  # noqa: E402,F401 (kernels_can_run: autouse fixture)
from kernel_utils import DEVICE, ON_GPU  # noqa: E402
from tolerances import tol  # noqa: E402

ESTIMATORS = ["kl", "abs", "mse", "k3", "full"]
MASK_DTYPES = [torch.bool, torch.int64, torch.float32]


pytestmark = [
    # the interpreter evaluates both sides of tl.where in numpy, and empty masks divide 0 by 0 on purpose
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]





def _mask(B, T, generator, dtype=torch.bool):
    """Right-padded responses of random length, a hole in the middle of row 0, row 1 empty (when B > 1)."""
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    mask = torch.arange(T) < lengths[:, None]
    if T > 4:
        mask[0, T // 2] = False
        mask[-1] = True  # one row whose last token is the last position
    if B > 1:
        mask[1] = False
    return mask.to(dtype).to(DEVICE)


def _inputs(B, T, seed=0, dtype=torch.float32, mask_dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g) * 3
    ref_logprobs = logprobs + 0.5 * torch.randn(B, T, generator=g)
    full = torch.rand(B, T, generator=g)
    scores = torch.randn(B, generator=g)
    return dict(logprobs=logprobs.to(dtype).to(DEVICE), ref_logprobs=ref_logprobs.to(dtype).to(DEVICE),
                mask=_mask(B, T, g, mask_dtype), scores=scores.to(dtype).to(DEVICE), kl=full.to(dtype).to(DEVICE))


def _check(inputs, estimator, kl_coef=0.2):
    rewards, kl = kl_penalty_rewards(**{**inputs, "kl_coef": kl_coef, "estimator": estimator})
    expected_rewards, expected_kl = reference.kl_penalty_rewards(**{**inputs, "kl_coef": kl_coef,
                                                                    "estimator": estimator})
    assert rewards.dtype == kl.dtype == torch.float32
    # same (possibly bf16) inputs on both sides, float32 math on both: float32 tolerance
    torch.testing.assert_close(rewards, expected_rewards, **tol(torch.float32))
    torch.testing.assert_close(kl, expected_kl, **tol(torch.float32))
    return rewards, kl


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_matches_reference(estimator, dtype, mask_dtype):
    _check(_inputs(5, 37, dtype=dtype, mask_dtype=mask_dtype), estimator)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (4, 1), (3, 2)])
@pytest.mark.parametrize("estimator", ["kl", "k3"])
def test_tiny_shapes(shape, estimator):
    _check(_inputs(*shape, seed=3), estimator)


@pytest.fixture()
def small_blocks(monkeypatch):
    """Several position blocks per row and two rows per program."""
    monkeypatch.setattr(_launch, "MAX_TOKEN_BLOCK_T", 8)
    monkeypatch.setattr(_launch, "INTERPRETER_TOKEN_TILE", 16)
    monkeypatch.setattr(_launch, "GPU_TOKEN_TILE", 16)


@pytest.mark.parametrize("estimator", ["kl", "full"])
def test_last_token_found_across_blocks(small_blocks, estimator):
    B, T = 7, 30  # 4 blocks of 8 from the end, the first one partial
    inputs = _inputs(B, T, seed=1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :3] = True  # last token in the leftmost block
    mask[2, 5:17] = True  # last token inside a middle block ...
    mask[2, 25] = True  # ... unless a later isolated token
    mask[3, 29] = True  # only the very last position
    mask[4, 0] = True  # only the very first position
    mask[5, 8:16] = True  # ends exactly at a block boundary (blocks: [0, 8), [8, 16), [16, 24), [24, 30))
    mask[6, 6:14] = True
    inputs["mask"] = mask.to(DEVICE)
    rewards, _ = _check(inputs, estimator)
    # the score lands exactly once per non-empty row
    kl = reference.kl_penalty_rewards(**{**inputs, "kl_coef": 1.0, "estimator": estimator})[1]
    plain = -0.2 * kl * inputs["mask"]
    assert ((rewards - plain).abs() > 0).sum(1).tolist() == [1, 0, 1, 1, 1, 1, 1]


def test_non_contiguous_inputs():
    B, T = 4, 23
    base = _inputs(B, T + 1, seed=2)
    inputs = dict(
        logprobs=base["logprobs"][:, 1:],  # a column slice
        ref_logprobs=base["ref_logprobs"][:, :-1].t().contiguous().t(),  # column-major
        mask=base["mask"][:, :-1],
        scores=torch.randn(2 * B, device=DEVICE)[::2],  # strided scores
        kl=base["kl"][:, 1:],
    )
    assert not inputs["logprobs"].is_contiguous() and not inputs["ref_logprobs"].is_contiguous()
    for estimator in ESTIMATORS:
        _check(inputs, estimator)


def test_full_returns_the_float32_kl_itself_and_upcasts_others():
    inputs = _inputs(3, 9, seed=4)
    _, kl = kl_penalty_rewards(**inputs, kl_coef=0.1, estimator="full")
    assert kl is inputs["kl"]  # as the reference: kl.float() of a float32 tensor
    inputs["kl"] = inputs["kl"].to(torch.bfloat16)
    _, kl = _check(inputs, "full")
    assert kl.dtype == torch.float32


def test_k3_is_accurate_for_small_log_ratios():
    """eˣ − 1 − x by series for |x| < 1: relative error ~1e-7 where the direct formula cancels."""
    x = torch.cat([torch.logspace(-6, 0.7, 60), -torch.logspace(-6, 0.7, 60)])
    logprobs = torch.zeros(1, x.numel(), device=DEVICE)
    ref_logprobs = x[None].to(DEVICE)  # x = ref − logp
    _, kl = kl_penalty_rewards(logprobs, ref_logprobs, torch.ones_like(logprobs), torch.zeros(1, device=DEVICE),
                               0.1, "k3")
    exact = torch.expm1(x.double()) - x.double()
    rel = ((kl.double().cpu()[0] - exact).abs() / exact).max().item()
    assert rel < 2e-6, rel


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_fully_masked_batch_gets_no_scores(mask_dtype):
    inputs = _inputs(3, 5, seed=5, mask_dtype=mask_dtype)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    rewards, _ = _check(inputs, "abs")
    assert (rewards == 0).all()


def test_empty_batch():
    inputs = _inputs(1, 4)
    inputs = {k: v[:0] for k, v in inputs.items()}
    rewards, kl = kl_penalty_rewards(**inputs, kl_coef=0.1, estimator="kl")
    assert rewards.shape == kl.shape == (0, 4)


def test_ops_dispatches_to_the_kernel(monkeypatch):
    calls = spy_on(monkeypatch, kl_reward_module, "kl_penalty_rewards")
    inputs = _inputs(2, 5, seed=6)
    for _ in range(2):
        rewards, kl = ops.kl_penalty_rewards(**inputs, kl_coef=0.3, estimator="mse", backend="triton")
    expected = reference.kl_penalty_rewards(**inputs, kl_coef=0.3, estimator="mse")
    torch.testing.assert_close(rewards, expected[0], **tol(torch.float32))
    assert len(calls) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_one_million_tokens(estimator, dtype):
    _check(_inputs(128, 8192, seed=7, dtype=dtype), estimator)
    _check(_inputs(8, 131072 + 3, seed=8, dtype=dtype), estimator)
