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
