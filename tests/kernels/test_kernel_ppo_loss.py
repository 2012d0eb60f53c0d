"""kernels/ppo_loss.py forward stats and backward against reference.ppo_loss + torch autograd."""

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
from fastppo.kernels import ppo_loss as ppo_loss_module  # noqa: E402
from fastppo.kernels.ppo_loss import ppo_loss  # noqa: E402
from fastppo.op_outputs import PPOLossSettings  # noqa: E402
from kernel_utils import kernels_can_run, spy_on  # noqa: E402,F401 (kernels_can_run: autouse fixture)
from kernel_utils import DEVICE, ON_GPU  # noqa: E402
from tolerances import tol  # noqa: E402

NAMES = ("logprobs", "old_logprobs", "values", "old_values", "advantages", "returns")
STATS = ("loss", "pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "policykl", "ratio_mean",
         "vpred_mean", "value_error", "ratio", "pg_clipfrac_lower")
TIS_STATS = ("tis_weight_mean", "tis_clipfrac")  # set only with rollout_logprobs, else None
# upstream gradients of (loss, pg_loss, vf_loss); None = that output unused
UPSTREAM = (0.7, -1.3, 2.1)


pytestmark = [
    # the interpreter evaluates both sides of tl.where in numpy, and empty masks divide 0 by 0 on purpose
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]





def _inputs(B, T, seed=0, dtype=torch.float32, mask_dtype=torch.bool, spread=0.3, rollout_spread=None,
            rollout_dtype=None):
    """Ratios and values spread by `spread` around the old ones: with ε = 0.2 some tokens clip, others not.

    `rollout_spread`: also rollout_logprobs = old − δ, δ ~ N(0, rollout_spread²) (a generator of its
    own, so the other inputs stay those of the same seed without it), in `rollout_dtype` (default
    `dtype`): the importance weights exp(δ) lie on both sides of 1 and, for spread ~0.5, of a cap ~1.5.
    """
    g = torch.Generator().manual_seed(seed)
    old_logprobs = -torch.rand(B, T, generator=g) * 3
    old_values = torch.randn(B, T, generator=g)
    tensors = dict(
        logprobs=old_logprobs + spread * torch.randn(B, T, generator=g),
        old_logprobs=old_logprobs,
        values=old_values + spread * torch.randn(B, T, generator=g),
        old_values=old_values,
        advantages=torch.randn(B, T, generator=g),
        returns=old_values + torch.randn(B, T, generator=g),
    )
    mask = torch.rand(B, T, generator=g) > 0.25
    if B > 1:
        mask[1] = False  # a fully masked row
    tensors = {k: v.to(dtype).to(DEVICE) for k, v in tensors.items()}
    if rollout_spread is not None:
        g_rollout = torch.Generator().manual_seed(seed + 7919)
        rollout = (old_logprobs - rollout_spread * torch.randn(B, T, generator=g_rollout)).clamp_max(0.0)
        tensors["rollout_logprobs"] = rollout.to(rollout_dtype or dtype).to(DEVICE)
    return dict(**tensors, mask=mask.to(mask_dtype).to(DEVICE))


def _run(fn, inputs, upstream=UPSTREAM, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, dual_clip=None,
         **options):
    """fn's outputs and the gradients of Σ upstream_i·N·(loss, pg_loss, vf_loss)_i w.r.t. logprobs and values.

    The factor N (tokens) keeps per-token gradients O(1), so the float32 atol is not vacuous.
    `options` (e.g. rollout_is_cap) go to fn as they are; with `importance_sampling_level`, as a settings record.
    """
    leaves = {k: (v.detach().clone().requires_grad_() if k in ("logprobs", "values") else v) for k, v in inputs.items()}
    level = options.pop("importance_sampling_level", None)
    if level is None:
        out = fn(**leaves, cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef, dual_clip=dual_clip,
                 **options)
    else:  # an option only the settings record holds
        settings = PPOLossSettings(cliprange, cliprange_value, vf_coef, dual_clip, options.pop("rollout_is_cap", 2.0),
                                   level)
        out = fn(**leaves, settings=settings, **options)
    n = inputs["mask"].numel()
    terms = [g * n * x for g, x in zip(upstream, (out.loss, out.pg_loss, out.vf_loss)) if g is not None]
    if terms:
        sum(terms).backward()
    return out, leaves["logprobs"].grad, leaves["values"].grad


def _check(inputs, upstream=UPSTREAM, **kwargs):
    out, dlogp, dv = _run(ppo_loss, inputs, upstream, **kwargs)
    expected, expected_dlogp, expected_dv = _run(reference.ppo_loss, inputs, upstream, **kwargs)
    assert isinstance(out, reference.PPOLossOutput)
    with_tis = "rollout_logprobs" in inputs
    for name in STATS + (TIS_STATS if with_tis else ()):
        got, want = getattr(out, name), getattr(expected, name)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        # same inputs on both sides, float32 math on both: float32 tolerance
        torch.testing.assert_close(got, want, **tol(torch.float32), equal_nan=True, msg=name)
    assert not out.ratio.requires_grad and not out.pg_clipfrac.requires_grad
    for name in TIS_STATS:
        if with_tis:
            assert getattr(out, name).shape == () and not getattr(out, name).requires_grad, name
        else:
            assert getattr(out, name) is None and getattr(expected, name) is None, name
    # gradients come back in the input dtype: one rounding to it may differ
    grad_tol = tol(inputs["logprobs"].dtype)
    for got, want in ((dlogp, expected_dlogp), (dv, expected_dv)):
        if want is None:
            assert got is None
        else:
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, **grad_tol, equal_nan=True)
    return out, dlogp, dv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_matches_reference_forward_and_backward(dtype, mask_dtype):
    out, _, _ = _check(_inputs(5, 37, dtype=dtype, mask_dtype=mask_dtype))
    assert 0.1 < out.pg_clipfrac < 0.9 and 0.1 < out.vf_clipfrac < 0.9  # clipping active for some tokens only


@pytest.mark.parametrize("upstream", [(1.0, None, None), (None, 2.0, None), (None, None, -0.5), (0.0, 1.0, 1.0)])
def test_each_upstream_gradient(upstream):
    _check(_inputs(3, 11, seed=1), upstream)


def test_trainer_keep_factor():
    """The trainer multiplies the losses by a 0/1 tensor and backpropagates loss only."""
    inputs = _inputs(3, 11, seed=2)
    for keep in (1.0, 0.0):
        grads = []
        for fn in (ppo_loss, reference.ppo_loss):
            lp = inputs["logprobs"].clone().requires_grad_()
            v = inputs["values"].clone().requires_grad_()
            out = fn(lp, inputs["old_logprobs"], v, *(inputs[k] for k in NAMES[3:]), inputs["mask"], 0.2, 0.2, 0.1)
            keep_t = torch.tensor(keep, device=DEVICE)
            out = out._replace(loss=out.loss * keep_t, pg_loss=out.pg_loss * keep_t, vf_loss=out.vf_loss * keep_t)
            out.loss.backward()
            grads.append((lp.grad, v.grad))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, **tol(torch.float32))


def test_only_values_or_only_logprobs_need_grad():
    inputs = _inputs(2, 9, seed=3)
    for trainable in ("logprobs", "values"):
        leaf = inputs[trainable].clone().requires_grad_()
        args = {**inputs, trainable: leaf}
        ppo_loss(**args, cliprange=0.2, cliprange_value=0.2, vf_coef=0.5).loss.backward()
        ref_leaf = inputs[trainable].clone().requires_grad_()
        reference.ppo_loss(**{**inputs, trainable: ref_leaf}, cliprange=0.2, cliprange_value=0.2,
                           vf_coef=0.5).loss.backward()
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, **tol(torch.float32))


def test_ties_and_clip_boundaries_match_autograd():
    """Exact ties split the gradient in half (torch.maximum); clamp passes it on its inclusive bounds."""
    B, T = 2, 8
    inputs = _inputs(B, T, seed=4)
    inputs["mask"] = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    # row 0: the first PPO epoch — ratio exactly 1, values exactly old; ties everywhere
    inputs["logprobs"][0] = inputs["old_logprobs"][0]
    inputs["values"][0] = inputs["old_values"][0]
    # row 1: value moved by 3 from old with ε_v = 1, return halfway between v and its clip → (v−R)² == (v_c−R)²
    inputs["old_values"][1] = 0.0
    inputs["values"][1] = 3.0
    inputs["returns"][1] = 2.0
    inputs["advantages"][1, :4] = 0.0  # −A·r == −A·clip(r) == 0: pg ties with the ratio out of range
    for cliprange, cliprange_value in ((0.2, 1.0), (0.0, 0.0)):  # 0: the clip range is the single point 1
        _check(inputs, cliprange=cliprange, cliprange_value=cliprange_value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dual_clip_matches_reference(dtype):
    """Ratios spread wide, so some negative-advantage tokens pass −A·c and are held there."""
    inputs = _inputs(4, 37, seed=13, dtype=dtype, spread=1.5)
    out, _, _ = _check(inputs, dual_clip=3.0)
    assert 0.0 < out.pg_clipfrac_lower < out.pg_clipfrac
    plain, _, _ = _check(inputs)
    assert plain.pg_clipfrac_lower == 0.0 and out.pg_loss < plain.pg_loss


def test_dual_clip_by_hand_and_its_ties():
    """Four tokens, A = −1, ε = 0.2, c = 3: ratio 5 is held at 3 (no gradient), ratio 3 ties (half),
    ratio 2 and ratio 0.5 (clipped to 0.8) are untouched by the dual clip."""
    ratios = torch.tensor([[5.0, 3.0, 2.0, 0.5]])
    inputs = _inputs(1, 4, seed=14)
    inputs.update(logprobs=ratios.log().to(DEVICE), old_logprobs=torch.zeros(1, 4, device=DEVICE),
                  advantages=-torch.ones(1, 4, device=DEVICE), mask=torch.ones(1, 4, dtype=torch.bool, device=DEVICE))
    for fn in (ppo_loss, reference.ppo_loss):
        out, dlogp, _ = _run(fn, inputs, upstream=(None, 1.0, None), dual_clip=3.0)
        # per-token losses 3, 3, 2, 0.8 → mean 2.2; d/dlogp (× N = 4 by _run) = r·[0, ½, 1, 0] for −A = 1
        torch.testing.assert_close(out.pg_loss, torch.tensor(2.2, device=DEVICE))
        torch.testing.assert_close(dlogp, torch.tensor([[0.0, 1.5, 2.0, 0.0]], device=DEVICE))
        assert out.pg_clipfrac_lower == 0.25  # only ratio 5 is strictly past −A·c
    _check(inputs, upstream=(None, 1.0, None), dual_clip=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_higher_matches_reference(dtype):
    """cliprange=(low, high): the ratio clipped to [1 − low, 1 + high], alone and with the dual clip."""
    inputs = _inputs(4, 37, seed=21, dtype=dtype, spread=0.5)
    wide, _, _ = _check(inputs, cliprange=(0.2, 0.5))
    plain, _, _ = _check(inputs, cliprange=0.2)
    assert 0 < wide.pg_clipfrac < plain.pg_clipfrac  # a higher upper bound clips fewer tokens, still some
    _check(inputs, cliprange=(0.1, 0.3), dual_clip=3.0)


def test_clip_higher_by_hand():
    """Ratios 0.5, 1.5, 1.5, 0.5 with A = 1, 1, −1, −1 and bounds [0.8, 1.28]: token losses −0.5,
    −1.28 (clipped), 1.5, 0.8 (clipped) → mean 0.13; the clipped tokens get no gradient. (0.2, 0.2) is
    cliprange=0.2 exactly."""
    inputs = _inputs(1, 4, seed=22)
    inputs.update(logprobs=torch.tensor([[0.5, 1.5, 1.5, 0.5]]).log().to(DEVICE),
                  old_logprobs=torch.zeros(1, 4, device=DEVICE),
                  advantages=torch.tensor([[1.0, 1.0, -1.0, -1.0]], device=DEVICE),
                  mask=torch.ones(1, 4, dtype=torch.bool, device=DEVICE))
    for fn in (ppo_loss, reference.ppo_loss):
        out, dlogp, _ = _run(fn, inputs, upstream=(None, 1.0, None), cliprange=(0.2, 0.28))
        torch.testing.assert_close(out.pg_loss, torch.tensor(0.13, device=DEVICE))
        torch.testing.assert_close(dlogp, torch.tensor([[-0.5, 0.0, 1.5, 0.0]], device=DEVICE))
        assert out.pg_clipfrac == 0.5
        pair, symmetric = _run(fn, inputs, cliprange=(0.2, 0.2))[0], _run(fn, inputs, cliprange=0.2)[0]
        for name in STATS:
            torch.testing.assert_close(getattr(pair, name), getattr(symmetric, name), rtol=0, atol=0)


@pytest.mark.parametrize("cliprange", [-0.1, (0.2,), (0.2, -0.1), (0.2, float("nan")), "0.2", (True, 0.2)])
def test_ops_refuses_a_bad_cliprange(cliprange):
    inputs = _inputs(1, 3, seed=23)
    with pytest.raises(ValueError, match="cliprange"):
        ops.ppo_loss(*(inputs[k] for k in NAMES), inputs["mask"], cliprange, 0.2, 0.1)


def test_dual_clip_must_exceed_one():
    inputs = _inputs(1, 3, seed=15)
    for bad in (1.0, 0.5, "3"):
        with pytest.raises(ValueError, match="dual_clip must be a number > 1"):
            ops.ppo_loss(*(inputs[k] for k in NAMES), inputs["mask"], 0.2, 0.2, 0.1, dual_clip=bad)


# --------------------------------------------------------------------------- truncated importance sampling


def test_without_rollout_logprobs_the_tis_stats_are_none():
    """The default path (ROLLOUT_IS=False): today's outputs, checked against the reference by _check,
    and no TIS statistics on either side."""
    inputs = _inputs(3, 13, seed=20)
    out, _, _ = _check(inputs)
    out_dual, _, _ = _check(inputs, dual_clip=2.0)
    for result in (out, out_dual, ops.ppo_loss(*(inputs[k] for k in NAMES), inputs["mask"], 0.2, 0.2, 0.1,
                                                  backend="triton")):
        assert result.tis_weight_mean is None and result.tis_clipfrac is None


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("dtype,rollout_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.bfloat16), (torch.float16, torch.float32)])
def test_tis_matches_reference(dtype, rollout_dtype, dual_clip):
    """The cap (1.5) binds for some tokens and not others; other weights are below 1."""
    inputs = _inputs(5, 37, seed=21, dtype=dtype, spread=1.0, rollout_spread=0.5, rollout_dtype=rollout_dtype)
    out, _, _ = _check(inputs, dual_clip=dual_clip, rollout_is_cap=1.5)
    assert 0.05 < out.tis_clipfrac < 0.5
    weights = torch.exp(inputs["old_logprobs"].float() - inputs["rollout_logprobs"].float())[inputs["mask"]]
    assert (weights < 0.9).any() and ((weights > 1.1) & (weights < 1.5)).any()
    plain, _, _ = _check({k: v for k, v in inputs.items() if k != "rollout_logprobs"}, dual_clip=dual_clip)
    assert not torch.allclose(out.pg_loss, plain.pg_loss)  # the weights changed the loss ...
    for name in ("vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio_mean", "pg_clipfrac_lower"):
        assert torch.equal(getattr(out, name), getattr(plain, name)), name  # ... and nothing else


@pytest.mark.parametrize("upstream", [(1.0, None, None), (None, -2.0, None), (None, None, 0.5), (0.0, 1.0, 1.0)])
def test_tis_each_upstream_gradient(upstream):
    _check(_inputs(3, 11, seed=22, rollout_spread=0.5), upstream, rollout_is_cap=1.5)


def test_tis_by_hand():
    """Four tokens, ε = 0.2, cap 2 (the hand-worked case of test_reference): raw weights 3 (capped
    at 2), 0.5, 1, 1.25; per-token losses −1, 3, −0.5, −1.2 weighted to −2, 1.5, −0.5, −1.5."""
    inputs = _inputs(1, 4, seed=23)
    old = torch.full((1, 4), -1.0)
    inputs.update(
        logprobs=(old + torch.tensor([[1.0, 1.5, 0.5, 1.5]]).log()).to(DEVICE), old_logprobs=old.to(DEVICE),
        rollout_logprobs=(old - torch.tensor([[3.0, 0.5, 1.0, 1.25]]).log()).to(DEVICE),
        advantages=torch.tensor([[1.0, -2.0, 1.0, 1.0]], device=DEVICE),
        mask=torch.ones(1, 4, dtype=torch.bool, device=DEVICE))
    for fn in (ppo_loss, reference.ppo_loss):
        out, dlogp, _ = _run(fn, inputs, upstream=(None, 1.0, None), rollout_is_cap=2.0)
        torch.testing.assert_close(out.pg_loss, torch.tensor(-0.625, device=DEVICE))
        # d/dlogp (× N = 4 by _run) = −A·r·w on unsaturated tokens, 0 where the clamp holds r at 1.2
        torch.testing.assert_close(dlogp, torch.tensor([[-2.0, 1.5, -0.5, 0.0]], device=DEVICE))
        torch.testing.assert_close(out.tis_weight_mean, torch.tensor(4.75 / 4, device=DEVICE))
        assert out.tis_clipfrac == 0.25
    _check(inputs, upstream=(None, 1.0, None), rollout_is_cap=2.0)


@pytest.mark.parametrize("rollout_is_cap", [2.0, 1.0])
def test_tis_weight_one_is_the_plain_loss(rollout_is_cap):
    """rollout = old: every weight is exactly exp(0) = 1, also with the cap at 1 (where the strict
    exp(old − rollout) > cap counts no token as clipped)."""
    inputs = _inputs(4, 19, seed=24, spread=1.0)
    same = dict(inputs, rollout_logprobs=inputs["old_logprobs"].clone())
    out, dlogp, dv = _check(same, dual_clip=2.0, rollout_is_cap=rollout_is_cap)
    plain, plain_dlogp, plain_dv = _run(ppo_loss, inputs, dual_clip=2.0)
    for name in STATS:
        torch.testing.assert_close(getattr(out, name), getattr(plain, name), **tol(torch.float32), msg=name)
    torch.testing.assert_close(dlogp, plain_dlogp, **tol(torch.float32))
    torch.testing.assert_close(dv, plain_dv, **tol(torch.float32))
    assert out.tis_weight_mean == 1.0 and out.tis_clipfrac == 0.0


def test_tis_many_tiles_few_programs(small_blocks):
    _check(_inputs(7, 37, seed=25, spread=1.5, rollout_spread=0.5), dual_clip=2.0, rollout_is_cap=1.3)


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (6, 1)])
def test_tis_tiny_shapes(shape):
    inputs = _inputs(*shape, seed=26, rollout_spread=0.5)
    inputs["mask"].view(-1)[0] = True
    _check(inputs, rollout_is_cap=1.2)


def test_tis_fully_masked_batch_is_nan_like_the_reference():
    inputs = _inputs(2, 5, seed=27, rollout_spread=0.5)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    out, _, _ = _check(inputs)
    assert out.tis_weight_mean.isnan() and out.tis_clipfrac.isnan()


def test_tis_non_contiguous_inputs():
    inputs = _inputs(3, 14, seed=28, rollout_spread=0.5)
    views = {k: v[:, 1:] for k, v in inputs.items()}
    views["rollout_logprobs"] = inputs["rollout_logprobs"][:, :-1].t().contiguous().t()  # column-major
    views["logprobs"] = inputs["logprobs"][:, :-1].t().contiguous().t()
    assert not views["rollout_logprobs"].is_contiguous() and not views["old_logprobs"].is_contiguous()
    _check(views, rollout_is_cap=1.5)


def test_tis_weights_are_constants():
    """No gradient reaches rollout_logprobs (nor, in the kernel, old_logprobs), as in the reference."""
    inputs = _inputs(2, 7, seed=29, rollout_spread=0.5)
    rollout = inputs["rollout_logprobs"].clone().requires_grad_()
    lp = inputs["logprobs"].clone().requires_grad_()
    out = ppo_loss(lp, *(inputs[k] for k in NAMES[1:]), inputs["mask"], 0.2, 0.2, 0.1, rollout_logprobs=rollout)
    out.loss.backward()
    assert lp.grad is not None and rollout.grad is None
    assert not out.tis_weight_mean.requires_grad and not out.tis_clipfrac.requires_grad


def test_tis_ops_dispatches_to_the_kernel(monkeypatch):
    calls = spy_on(monkeypatch, ppo_loss_module, "ppo_loss")
    inputs = _inputs(2, 6, seed=30, rollout_spread=0.5)
    out = ops.ppo_loss(*(inputs[k] for k in NAMES), inputs["mask"], 0.2, 0.2, 0.1, backend="triton",
                       rollout_logprobs=inputs["rollout_logprobs"], rollout_is_cap=1.5)
    expected = reference.ppo_loss(**inputs, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, rollout_is_cap=1.5)
    for name in ("loss",) + TIS_STATS:
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), **tol(torch.float32), msg=name)
    assert len(calls) == 1


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4), T=st.integers(1, 40), seed=st.integers(0, 2**16), spread=st.floats(0.0, 1.5),
    rollout_spread=st.floats(0.0, 1.0), rollout_is_cap=st.floats(0.5, 3.0), dual_clip=st.none() | st.floats(1.5, 4.0),
    upstream=st.tuples(*[st.none() | st.floats(-3.0, 3.0)] * 3),
)
def test_tis_property(B, T, seed, spread, rollout_spread, rollout_is_cap, dual_clip, upstream):
    inputs = _inputs(B, T, seed=seed, spread=spread, rollout_spread=rollout_spread)
    inputs["mask"].view(-1)[0] = True
    _check(inputs, upstream, dual_clip=dual_clip, rollout_is_cap=rollout_is_cap)


@pytest.fixture()
def small_blocks(monkeypatch):
    """Many tiles (2 rows × 8 positions) spread over 3 programs: the grid-stride loop and the reduction."""
    monkeypatch.setattr(_launch, "MAX_TOKEN_BLOCK_T", 8)
    monkeypatch.setattr(_launch, "INTERPRETER_TOKEN_TILE", 16)
    monkeypatch.setattr(_launch, "GPU_TOKEN_TILE", 16)
    monkeypatch.setattr(_launch, "MAX_TOKEN_PARTIALS", 3)


def test_many_tiles_few_programs(small_blocks):
    _check(_inputs(7, 37, seed=5))
    _check(_inputs(7, 37, seed=5, spread=1.5), dual_clip=2.0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (6, 1)])
def test_tiny_shapes(shape):
    inputs = _inputs(*shape, seed=6)
    inputs["mask"].view(-1)[0] = True
    _check(inputs)


def test_fully_masked_batch_is_nan_like_the_reference():
    inputs = _inputs(2, 5, seed=7)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    out, _, _ = _check(inputs)  # gradients: NaN where the reference's are (0/0 · 0), equal elsewhere
    assert out.loss.isnan() and out.pg_clipfrac.isnan()


def test_non_contiguous_inputs():
    inputs = _inputs(3, 14, seed=8)
    views = {k: v[:, 1:] for k, v in inputs.items()}  # column slices
    views["returns"] = inputs["returns"][:, :-1].t().contiguous().t()  # column-major
    views["logprobs"] = inputs["logprobs"][:, :-1].t().contiguous().t()
    assert not views["values"].is_contiguous() and not views["logprobs"].is_contiguous()
    _check(views)


def test_gradient_flows_through_a_sliced_leaf():
    """logprobs = base[:, :-1] as in the trainer: the gradient lands in the right columns of base."""
    inputs = _inputs(2, 7, seed=9)
    start = torch.cat([inputs["old_logprobs"], inputs["old_logprobs"][:, :1]], dim=1) + 0.1
    grads = []
    for fn in (ppo_loss, reference.ppo_loss):
        base = start.clone().requires_grad_()
        fn(base[:, :-1], *(inputs[k] for k in NAMES[1:]), inputs["mask"], 0.2, 0.2, 0.1).pg_loss.backward()
        grads.append(base.grad)
    torch.testing.assert_close(*grads, **tol(torch.float32))


def test_ops_dispatches_to_the_kernel(monkeypatch):
    calls = spy_on(monkeypatch, ppo_loss_module, "ppo_loss")
    inputs = _inputs(2, 6, seed=10)
    for _ in range(2):  # the second lookup too (a submodule named like its op can shadow it)
        out = ops.ppo_loss(*(inputs[k] for k in NAMES), inputs["mask"], 0.2, 0.2, 0.1, backend="triton")
    expected = reference.ppo_loss(**inputs, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    torch.testing.assert_close(out.loss, expected.loss, **tol(torch.float32))
    assert len(calls) == 2


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4), T=st.integers(1, 40), seed=st.integers(0, 2**16),
    cliprange=st.floats(0.0, 0.5), cliprange_value=st.floats(0.0, 1.0), vf_coef=st.floats(0.0, 2.0),
    spread=st.floats(0.0, 1.0), upstream=st.tuples(*[st.none() | st.floats(-3.0, 3.0)] * 3),
)
def test_property(B, T, seed, cliprange, cliprange_value, vf_coef, spread, upstream):
    inputs = _inputs(B, T, seed=seed, spread=spread)
    inputs["mask"].view(-1)[0] = True
    _check(inputs, upstream, cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_one_million_tokens(dtype):
    _check(_inputs(128, 8192, seed=11, dtype=dtype))
    _check(_inputs(3, 100003, seed=12, dtype=dtype))
    _check(_inputs(128, 8192, seed=31, dtype=dtype, spread=1.0, rollout_spread=0.5), dual_clip=3.0,
           rollout_is_cap=1.5)
