"""reference.py: hand-worked cases, float64 re-derivations and straightforward loops."""

import math

import pytest
import torch

from fastppo import reference
from tolerances import tol


def _close(actual, expected, dtype=torch.float32):
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), **tol(dtype))


# --------------------------------------------------------------------------- GAE


def test_gae_hand_worked_undiscounted():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.25, 1.0]])
    mask = torch.ones(1, 3)
    advantages, returns = reference.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # δ = [1+.25-.5, 0+1-.25, 2-1] = [.75, .75, 1]; A = reverse cumsum = [2.5, 1.75, 1]
    _close(advantages, [[2.5, 1.75, 1.0]])
    _close(returns, [[3.0, 2.0, 2.0]])  # with γ=λ=1, returns are the reward-to-go


def test_gae_hand_worked_discounted():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.25, 1.0]])
    advantages, _ = reference.gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.5)
    # δ2 = 1, A2 = 1; δ1 = 0 + .5·1 − .25 = .25, A1 = .25 + .25·1 = .5; δ0 = 1 + .5·.25 − .5 = .625, A0 = .625 + .25·.5
    _close(advantages, [[0.75, 0.5, 1.0]])


def test_gae_masks_values_and_rewards_past_the_response():
    rewards = torch.tensor([[1.0, 0.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    advantages, returns = reference.gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma=1.0, lam=1.0)
    # position 2 counts as V=0, r=0: δ1 = −.25, δ0 = 1 + .25 − .5 = .75
    _close(advantages, [[0.5, -0.25, 0.0]])
    _close(returns, [[1.0, 0.0, 0.0]])


def _gae_loop_float64(rewards, values, mask, gamma, lam):
    out = []
    for r_row, v_row, m_row in zip(rewards.double().tolist(), values.double().tolist(), mask.double().tolist()):
        r = [a * b for a, b in zip(r_row, m_row)]
        v = [a * b for a, b in zip(v_row, m_row)]
        adv, running = [0.0] * len(r), 0.0
        for t in range(len(r) - 1, -1, -1):
            next_v = v[t + 1] if t + 1 < len(r) else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            adv[t] = running
        out.append(adv)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33)])
def test_gae_matches_float64_loop(shape):
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.3).long()
    advantages, returns = reference.gae(rewards, values, mask, gamma=0.97, lam=0.9)
    expected = _gae_loop_float64(rewards, values, mask, 0.97, 0.9)
    _close(advantages, expected)
    _close(returns, expected + values.double() * mask)


# --------------------------------------------------------------------------- PPO loss


def _loss_inputs(logprob_shift, advantage, value_shift):
    old = torch.full((1, 3), -1.0)
    old_values = torch.zeros(1, 3)
    return dict(
        logprobs=old + logprob_shift, old_logprobs=old, values=old_values + value_shift, old_values=old_values,
        advantages=torch.full((1, 3), advantage), returns=old_values.clone(), mask=torch.ones(1, 3),
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
    )


def test_ppo_loss_clips_a_large_ratio_with_positive_advantage():
    out = reference.ppo_loss(**_loss_inputs(1.0, 1.0, 1.0))
    # ratio = e everywhere, clipped to 1.2: max(−e, −1.2) = −1.2, and every token is clipped
    _close(out.ratio, [[math.e] * 3])
    _close(out.pg_loss, -1.2)
    _close(out.pg_clipfrac, 1.0)
    # value moved by 1 from old, clipped to 0.2: max((1)², (0.2)²) = 1 → 0.5 · 1
    _close(out.vf_loss, 0.5)
    _close(out.vf_clipfrac, 0.0)
    _close(out.loss, -1.2 + 0.1 * 0.5)
    _close(out.approxkl, 0.5)
    _close(out.policykl, -1.0)
    _close(out.value_error, 1.0)


def test_ppo_loss_keeps_the_unclipped_term_with_negative_advantage():
    out = reference.ppo_loss(**_loss_inputs(1.0, -1.0, 0.1))
    _close(out.pg_loss, math.e)  # max(e, 1.2)
    _close(out.pg_clipfrac, 0.0)
    _close(out.vf_loss, 0.5 * 0.01)  # inside the clip range: (0.1)²


def test_ppo_loss_mask_excludes_tokens():
    inputs = _loss_inputs(0.0, 1.0, 0.0)
    inputs["advantages"] = torch.tensor([[1.0, 2.0, 100.0]])
    inputs["mask"] = torch.tensor([[1, 1, 0]])
    out = reference.ppo_loss(**inputs)
    _close(out.pg_loss, -1.5)  # ratio 1: −mean(adv over masked tokens)


def test_ppo_loss_gradients_match_float64_autograd():
    g = torch.Generator().manual_seed(2)
    shape = (3, 5)
    tensors = {name: torch.randn(shape, generator=g) for name in
               ("logprobs", "old_logprobs", "values", "old_values", "advantages", "returns")}
    mask = (torch.rand(shape, generator=g) > 0.2).float()

    def run(dtype):
        t = {k: v.to(dtype).clone().requires_grad_(k in ("logprobs", "values")) for k, v in tensors.items()}
        out = reference.ppo_loss(**t, mask=mask, cliprange=0.2, cliprange_value=0.3, vf_coef=0.7)
        (3.0 * out.loss).backward()
        return out.loss, t["logprobs"].grad, t["values"].grad

    loss32, glp32, gv32 = run(torch.float32)
    # float64 oracle: the same formula written out with float64 throughout
    t = {k: v.double().requires_grad_(k in ("logprobs", "values")) for k, v in tensors.items()}
    m = mask.double()
    ratio = torch.exp(t["logprobs"] - t["old_logprobs"])
    pg = torch.maximum(-t["advantages"] * ratio, -t["advantages"] * ratio.clamp(0.8, 1.2))
    vclip = torch.clamp(t["values"], t["old_values"] - 0.3, t["old_values"] + 0.3)
    vf = torch.maximum((t["values"] - t["returns"]) ** 2, (vclip - t["returns"]) ** 2)
    loss64 = (pg * m).sum() / m.sum() + 0.7 * 0.5 * (vf * m).sum() / m.sum()
    (3.0 * loss64).backward()
    _close(loss32, loss64.detach())
    _close(glp32, t["logprobs"].grad)
    _close(gv32, t["values"].grad)


def test_ppo_loss_tis_hand_worked():
    """Four tokens, old = −1, ε = 0.2, cap 2; ratios r = [1, 1.5, 0.5, 1.5], A = [1, −2, 1, 1],
    raw weights exp(old − rollout) = [3, 0.5, 1, 1.25] → w = [2, 0.5, 1, 1.25] (the first capped).

    per-token pg = max(−A·r, −A·clip(r)) = [−1, 3, −0.5, −1.2] (the last clipped: −1.2 > −1.5),
    weighted w·pg = [−2, 1.5, −0.5, −1.5] → pg_loss = −2.5 / 4 (N = Σm = 4, not Σw = 4.75).
    d pg_loss / d logp = w·(−A)·r / N on tokens whose r is not held by the clip:
    [2·(−1)·1, 0.5·2·1.5, 1·(−1)·0.5, 0] / 4.
    """
    old = torch.full((1, 4), -1.0)
    logprobs = (old + torch.tensor([[1.0, 1.5, 0.5, 1.5]]).log()).requires_grad_()
    rollout = old - torch.tensor([[3.0, 0.5, 1.0, 1.25]]).log()
    zeros = torch.zeros(1, 4)
    out = reference.ppo_loss(logprobs, old, zeros, zeros, torch.tensor([[1.0, -2.0, 1.0, 1.0]]), zeros,
                             torch.ones(1, 4), cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                             rollout_logprobs=rollout, rollout_is_cap=2.0)
    _close(out.pg_loss, -0.625)
    _close(out.loss, -0.625)  # values = returns: no value loss
    _close(out.tis_weight_mean, 4.75 / 4)
    _close(out.tis_clipfrac, 0.25)
    _close(out.pg_clipfrac, 0.25)  # the clip statistics do not see the weights
    _close(out.ratio_mean, 4.5 / 4)
    out.pg_loss.backward()
    _close(logprobs.grad, [[-0.5, 0.375, -0.125, 0.0]])
    # the cap is strict: a ratio exactly at it (here 1 = exp(0)) is not counted as clipped
    at_cap = reference.ppo_loss(logprobs.detach(), old, zeros, zeros, zeros, zeros, torch.ones(1, 4), 0.2, 0.2,
                                0.1, rollout_logprobs=old, rollout_is_cap=1.0)
    assert at_cap.tis_clipfrac.item() == 0.0 and at_cap.tis_weight_mean.item() == 1.0


def _random_loss_inputs(seed, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=g) for name in
               ("logprobs", "old_logprobs", "values", "old_values", "advantages", "returns")}
    tensors["mask"] = (torch.rand(shape, generator=g) > 0.2).float()
    tensors["mask"][0] = 0.0  # a fully masked row
    return tensors


def test_ppo_loss_tis_weight_one_is_the_plain_loss():
    """rollout_logprobs = old_logprobs: w = exp(0) = 1 exactly, so every output and gradient is bit-equal."""
    tensors = _random_loss_inputs(7)

    def run(**tis):
        t = {k: v.clone().requires_grad_(k in ("logprobs", "values")) for k, v in tensors.items()}
        out = reference.ppo_loss(**t, cliprange=0.2, cliprange_value=0.3, vf_coef=0.7, dual_clip=2.0, **tis)
        (1.7 * out.loss - 0.4 * out.pg_loss).backward()
        return out, t["logprobs"].grad, t["values"].grad

    plain, plain_dlogp, plain_dv = run()
    assert plain.tis_weight_mean is None and plain.tis_clipfrac is None
    out, dlogp, dv = run(rollout_logprobs=tensors["old_logprobs"].clone(), rollout_is_cap=2.0)
    for name in set(reference.PPOLossOutput._fields) - {"tis_weight_mean", "tis_clipfrac", "kl_loss"}:
        assert torch.equal(getattr(out, name), getattr(plain, name)), name
    assert torch.equal(dlogp, plain_dlogp) and torch.equal(dv, plain_dv)
    assert out.tis_weight_mean.item() == 1.0 and out.tis_clipfrac.item() == 0.0
    assert out.tis_weight_mean.dtype == torch.float32 and out.tis_weight_mean.shape == ()


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_loss_tis_gradients_match_float64_autograd(dual_clip):
    tensors = _random_loss_inputs(8, (4, 9))
    g = torch.Generator().manual_seed(9)
    rollout = tensors["old_logprobs"] - 0.6 * torch.randn(4, 9, generator=g)  # weights on both sides of the cap
    cap = 1.4
    t = {k: v.clone().requires_grad_(k in ("logprobs", "values")) for k, v in tensors.items()}
    result = reference.ppo_loss(**t, cliprange=0.2, cliprange_value=0.3, vf_coef=0.7, dual_clip=dual_clip,
                                rollout_logprobs=rollout.bfloat16(), rollout_is_cap=cap)
    (3.0 * result.loss - result.pg_loss).backward()
    # float64 oracle, written out; the rollout log-probs are the bf16 ones the reference was given
    d = {k: v.double().requires_grad_(k in ("logprobs", "values")) for k, v in tensors.items()}
    m = d["mask"]
    raw = torch.exp(d["old_logprobs"] - rollout.bfloat16().double())
    w = raw.clamp(max=cap)
    ratio = torch.exp(d["logprobs"] - d["old_logprobs"])
    pg = torch.maximum(-d["advantages"] * ratio, -d["advantages"] * ratio.clamp(0.8, 1.2))
    if dual_clip is not None:
        pg = torch.where(d["advantages"] < 0, torch.minimum(pg, -d["advantages"] * dual_clip), pg)
    pg_loss = (w * pg * m).sum() / m.sum()
    vclip = torch.clamp(d["values"], d["old_values"] - 0.3, d["old_values"] + 0.3)
    vf = torch.maximum((d["values"] - d["returns"]) ** 2, (vclip - d["returns"]) ** 2)
    loss = pg_loss + 0.7 * 0.5 * (vf * m).sum() / m.sum()
    (3.0 * loss - pg_loss).backward()
    _close(result.loss, loss.detach())
    _close(result.pg_loss, pg_loss.detach())
    _close(result.tis_weight_mean, (w * m).sum() / m.sum())
    _close(result.tis_clipfrac, ((raw > cap).double() * m).sum() / m.sum())
    assert 0 < result.tis_clipfrac < 1 and (w[m.bool()] < 1).any()
    _close(t["logprobs"].grad, d["logprobs"].grad)
    _close(t["values"].grad, d["values"].grad)


def test_ppo_loss_tis_weights_are_constants():
    tensors = _random_loss_inputs(10)
    rollout = (tensors["old_logprobs"] - 0.3).requires_grad_()
    logprobs = tensors.pop("logprobs").requires_grad_()
    out = reference.ppo_loss(logprobs, **tensors, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                             rollout_logprobs=rollout)
    out.loss.backward()
    assert logprobs.grad is not None and rollout.grad is None
    assert not out.tis_weight_mean.requires_grad and not out.tis_clipfrac.requires_grad


# --------------------------------------------------------------------------- log-probs and KL


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_float64(temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 37, generator=g) * 3
    labels = torch.randint(0, 37, (4, 5), generator=g)
    logp, entropy = reference.logprobs_from_logits(logits, labels, temperature, return_entropy=True)
    z = logits.double() / temperature
    logp64 = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
    p64 = torch.softmax(z, -1)
    _close(logp, logp64)
    _close(entropy, -(p64 * p64.log()).sum(-1))
    assert (logp <= 0).all()


def test_logprobs_hand_worked_uniform():
    logits = torch.zeros(2, 4)
    _close(reference.logprobs_from_logits(logits, torch.tensor([0, 3])), [math.log(0.25)] * 2)


def test_logprobs_gradient_is_onehot_minus_softmax():
    logits = torch.randn(3, 11, requires_grad=True)
    labels = torch.tensor([0, 5, 10])
    upstream = torch.tensor([1.0, -2.0, 0.5])
    (reference.logprobs_from_logits(logits, labels) * upstream).sum().backward()
    expected = upstream[:, None] * (torch.nn.functional.one_hot(labels, 11) - torch.softmax(logits.detach(), -1))
    _close(logits.grad, expected)


def test_full_kl_matches_definition_and_is_zero_for_equal_inputs():
    g = torch.Generator().manual_seed(4)
    p_logits, q_logits = torch.randn(3, 6, 50, generator=g), torch.randn(3, 6, 50, generator=g)
    p, q = torch.softmax(p_logits.double(), -1), torch.softmax(q_logits.double(), -1)
    _close(reference.full_kl(p_logits, q_logits), (p * (p.log() - q.log())).sum(-1))
    _close(reference.full_kl(p_logits, p_logits), torch.zeros(3, 6))


@pytest.mark.parametrize("estimator,formula", [
    ("kl", lambda d: d),
    ("abs", lambda d: abs(d)),
    ("mse", lambda d: 0.5 * d * d),
    ("k3", lambda d: math.exp(-d) - 1 + d),
])
def test_kl_estimators_and_rewards_match_a_loop(estimator, formula):
    g = torch.Generator().manual_seed(5)
    logprobs, ref_logprobs = -torch.rand(3, 6, generator=g) * 3, -torch.rand(3, 6, generator=g) * 3
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    scores = torch.tensor([1.5, -2.0, 7.0])
    rewards, kl = reference.kl_penalty_rewards(logprobs, ref_logprobs, mask, scores, 0.3, estimator)
    for b in range(3):
        nonzero = [t for t in range(6) if mask[b, t]]
        for t in range(6):
            d = float(logprobs[b, t].double() - ref_logprobs[b, t].double())
            expected_kl = formula(d)
            expected_reward = (-0.3 * expected_kl if mask[b, t] else 0.0)
            if nonzero and t == nonzero[-1]:
                expected_reward += float(scores[b])
            assert kl[b, t].item() == pytest.approx(expected_kl, abs=1e-5)
            assert rewards[b, t].item() == pytest.approx(expected_reward, abs=1e-5)
    if estimator == "k3":
        assert (kl >= 0).all()


def test_full_estimator_uses_the_given_kl():
    kl = torch.tensor([[0.1, 0.2, 0.3]])
    rewards, out_kl = reference.kl_penalty_rewards(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3),
                                                   torch.tensor([1.0]), 2.0, "full", kl=kl)
    _close(out_kl, kl)
    _close(rewards, [[-0.2, -0.4, -0.6 + 1.0]])


# --------------------------------------------------------------------------- masked statistics


def test_masked_whiten_matches_float64():
    g = torch.Generator().manual_seed(6)
    values = torch.randn(4, 9, generator=g) * 5 + 2
    mask = (torch.rand(4, 9, generator=g) > 0.4).long()
    chosen = values.double()[mask.bool()]
    mean, var = chosen.mean(), chosen.var(unbiased=True)
    _close(reference.masked_whiten(values, mask), (values.double() - mean) / torch.sqrt(var + 1e-8))
    _close(reference.masked_whiten(values, mask, shift_mean=False),
           (values.double() - mean) / torch.sqrt(var + 1e-8) + mean)


def test_masked_var_single_position_is_finite():
    var = reference.masked_var(torch.tensor([[3.0, 5.0]]), torch.tensor([[0, 1]]))
    assert var.item() == 0.0  # TRL divides by zero here


def test_stacked_masked_means_and_vars_are_the_single_ones():
    g = torch.Generator().manual_seed(7)
    stacked = torch.randn(3, 4, 9, generator=g) * 3 + 1
    mask = (torch.rand(4, 9, generator=g) > 0.4).long()
    chosen = stacked.double()[:, mask.bool()]
    means = reference.masked_means(stacked, mask)
    _close(means, chosen.mean(-1))
    _close(reference.masked_vars(stacked, mask, means), chosen.var(-1, unbiased=True))
    for k in range(3):
        torch.testing.assert_close(means[k], reference.masked_mean(stacked[k], mask))
        torch.testing.assert_close(reference.masked_vars(stacked, mask, means)[k], reference.masked_var(stacked[k], mask))
    one = torch.tensor([[0, 1]])  # a single position: the biased (zero) variance, as masked_var
    assert reference.masked_vars(torch.tensor([[[3.0, 5.0]]]), one, torch.tensor([5.0])).tolist() == [0.0]
