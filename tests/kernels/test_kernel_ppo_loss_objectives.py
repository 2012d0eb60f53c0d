"""kernels/ppo_loss.py's objectives beyond TRL's: per-token loss weights (the loss aggregations) and GSPO's
sequence-level ratio, forward and backward against reference.ppo_loss + torch autograd."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (see kernel_utils)
pytest.importorskip("triton")

from fastppo import ops, reference  # noqa: E402
from fastppo.kernels import ppo_loss as ppo_loss_module  # noqa: E402
from fastppo.kernels.ppo_loss import ppo_loss  # noqa: E402
from fastppo.op_outputs import LOSS_AGGREGATIONS, PPOLossSettings  # noqa: E402
from kernel_utils import kernels_can_run  # noqa: E402,F401 (an autouse fixture)
from kernel_utils import DEVICE  # noqa: E402
from test_kernel_ppo_loss import _check, _inputs, _run  # noqa: E402
from tolerances import tol  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


def _weights(inputs, aggregation, rows=None):
    return reference.loss_aggregation_weights(inputs["mask"], aggregation, rows=rows)


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_weights_match_reference(aggregation, dtype):
    inputs = _inputs(5, 37, seed=21, dtype=dtype)
    weights = _weights(inputs, aggregation).to(dtype)  # any float dtype
    out, _, _ = _check({**inputs}, loss_weights=weights)
    assert 0.1 < out.pg_clipfrac < 0.9


def test_token_mean_weights_are_the_plain_loss():
    """w = m/N is TRL's masked mean: the weighted kernel gives the unweighted kernel's losses and gradients."""
    inputs = _inputs(4, 23, seed=22)
    inputs["mask"][1] = True  # no empty row: the weights' clamp(N, 1) never differs from N
    plain = _run(ppo_loss, inputs)
    weighted = _run(ppo_loss, inputs, loss_weights=_weights(inputs, "token-mean"))
    for got, want in zip((weighted[0].loss, weighted[0].pg_loss, weighted[0].vf_loss, *weighted[1:]),
                         (plain[0].loss, plain[0].pg_loss, plain[0].vf_loss, *plain[1:])):
        torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("options", [dict(dual_clip=3.0), dict(cliprange=(0.2, 0.28)),
                                     dict(rollout_is_cap=1.5)])
def test_loss_weights_with_the_other_options(options):
    inputs = _inputs(3, 19, seed=23, spread=1.0, rollout_spread=0.5 if "rollout_is_cap" in options else None)
    _check(inputs, loss_weights=_weights(inputs, "seq-mean-token-mean"), **options)


def test_loss_weights_by_hand():
    """Rows of 1 and 3 masked tokens, seq-mean-token-mean: w = ½ on row 0's token, ⅙ on row 1's. With ratio 1
    (no clip), A = 1 and the value loss off: pg_loss = −Σw = −1 and d pg_loss / d logp_t = −w_t."""
    mask = torch.tensor([[True, False, False], [True, True, True]], device=DEVICE)
    zeros = torch.zeros(2, 3, device=DEVICE)
    inputs = dict(logprobs=zeros, old_logprobs=zeros, values=zeros, old_values=zeros,
                  advantages=torch.ones(2, 3, device=DEVICE), returns=zeros, mask=mask)
    weights = _weights(inputs, "seq-mean-token-mean")
    torch.testing.assert_close(weights, torch.tensor([[1 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6]], device=DEVICE))
    for fn in (ppo_loss, reference.ppo_loss):
        lp = zeros.clone().requires_grad_()
        out = fn(**{**inputs, "logprobs": lp}, cliprange=0.2, cliprange_value=0.2, vf_coef=0.0,
                 loss_weights=weights)
        out.pg_loss.backward()
        torch.testing.assert_close(out.pg_loss, torch.tensor(-1.0, device=DEVICE))
        torch.testing.assert_close(lp.grad, -weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (3, 130)])
def test_sequence_ratio_matches_reference(dtype, shape):
    inputs = _inputs(*shape, seed=24, dtype=dtype, spread=0.15)
    out, _, _ = _check(inputs, importance_sampling_level="sequence")
    rows = inputs["mask"].any(-1)
    expected = torch.exp(reference.sequence_log_ratio(inputs["logprobs"], inputs["old_logprobs"], inputs["mask"]))
    torch.testing.assert_close(out.ratio[rows], expected[rows, None].expand(-1, shape[1]), **tol(torch.float32))


@pytest.mark.parametrize("options", [dict(cliprange=(0.0003, 0.0004)), dict(dual_clip=1.5, spread=2.0),
                                     dict(rollout_is_cap=1.5, rollout_spread=0.5), dict(aggregation=True)])
def test_sequence_ratio_with_the_other_options(options):
    """Clip bounds tight enough (3e-4, 4e-4: GSPO's own) that some sequences clip on each side."""
    spread, rollout_spread = options.pop("spread", 0.05), options.pop("rollout_spread", None)
    inputs = _inputs(6, 29, seed=25, spread=spread, rollout_spread=rollout_spread)
    if options.pop("aggregation", False):
        options["loss_weights"] = _weights(inputs, "seq-mean-token-mean")
    out, _, _ = _check(inputs, importance_sampling_level="sequence", **options)
    if "cliprange" in options:
        assert 0.0 < out.pg_clipfrac < 1.0


def test_sequence_ratio_by_hand():
    """One response, log-ratios 0.1 and 0.3 (mean 0.2), A = 1, no clip: every token's ratio is s = e^0.2,
    pg_loss = −s, and d pg_loss / d logp_t = −s/2 (each token's own gradient, s detached, over N = 2)."""
    old = torch.tensor([[-1.0, -2.0, -1.0]], device=DEVICE)
    logp = old + torch.tensor([[0.1, 0.3, 5.0]], device=DEVICE)  # the third token is masked out
    mask = torch.tensor([[True, True, False]], device=DEVICE)
    zeros = torch.zeros(1, 3, device=DEVICE)
    s = torch.exp(torch.tensor(0.2, device=DEVICE))
    for fn in (ppo_loss, reference.ppo_loss):
        lp = logp.clone().requires_grad_()
        out = fn(lp, old, zeros, zeros, torch.ones(1, 3, device=DEVICE), zeros, mask,
                 settings=PPOLossSettings(cliprange=10.0, vf_coef=0.0, importance_sampling_level="sequence"))
        out.pg_loss.backward()
        torch.testing.assert_close(out.pg_loss, -s)
        torch.testing.assert_close(out.ratio[0, :2], s.expand(2))
        torch.testing.assert_close(lp.grad, torch.stack([-s / 2, -s / 2, torch.zeros((), device=DEVICE)])[None])


class _CountedLaunches:
    """A Triton kernel whose `kernel[grid](...)` launches are counted."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


def test_sequence_ratio_adds_one_launch_only_for_gspo(monkeypatch):
    inputs = _inputs(2, 9, seed=26)
    counted = _CountedLaunches(ppo_loss_module._seq_log_ratio_kernel)
    monkeypatch.setattr(ppo_loss_module, "_seq_log_ratio_kernel", counted)
    launches = counted.launches
    ops.ppo_loss(**inputs, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, backend="triton")
    assert launches == []
    ops.ppo_loss(**inputs, backend="triton", settings=PPOLossSettings(importance_sampling_level="sequence"))
    assert len(launches) == 1


def test_settings_record_or_scalars_not_both():
    inputs = _inputs(2, 5, seed=27)
    with pytest.raises(TypeError, match="settings and cliprange"):
        ops.ppo_loss(**inputs, cliprange=0.2, settings=PPOLossSettings())
    with pytest.raises(TypeError, match="needs cliprange"):
        ops.ppo_loss(**inputs)
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        ops.ppo_loss(**inputs, settings=PPOLossSettings(importance_sampling_level="seq"))
    with pytest.raises(ValueError, match="loss_weights must have the shape of logprobs"):
        ops.ppo_loss(**inputs, settings=PPOLossSettings(), loss_weights=torch.ones(2, 6, device=DEVICE))
    via_record = ops.ppo_loss(**inputs, settings=PPOLossSettings(0.1, 0.3, 0.5, 2.0, 1.5), backend="torch")
    via_scalars = ops.ppo_loss(**inputs, cliprange=0.1, cliprange_value=0.3, vf_coef=0.5, dual_clip=2.0,
                               rollout_is_cap=1.5, backend="torch")
    assert via_record.loss == via_scalars.loss
