"""The critic-free advantage estimators of fastppo.reference, on hand-worked cases (issue 21's conventions)."""

import math

import pytest
import torch

from fastppo import reference


def _close(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_grpo_one_group_of_four_for_each_scaling():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3; Bessel variance (4 + 1 + 0 + 9) / 3
    std = math.sqrt(14 / 3)
    _close(reference.grpo_advantages(scores, 4), [c / (std + 1e-6) for c in (-2, -1, 0, 3)])
    _close(reference.grpo_advantages(scores, 4, "none"), [-2, -1, 0, 3])
    _close(reference.grpo_advantages(scores, 4, "batch"), [c / (std + 1e-6) for c in (-2, -1, 0, 3)])


def test_grpo_batch_scaling_and_a_group_of_equal_scores():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    by_group = reference.grpo_advantages(scores, 4)
    assert torch.equal(by_group[4:], torch.zeros(4))  # zero std: zero advantage, no NaN
    batch_std = math.sqrt(((scores - scores.mean()) ** 2).sum().item() / 7)
    _close(reference.grpo_advantages(scores, 4, "batch"), [c / (batch_std + 1e-6) for c in (-2, -1, 0, 3, 0, 0, 0, 0)])


def test_rloo_leaves_each_response_out_of_its_baseline():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 4.0])
    # group 1: r_i − mean of the other three; group 2 (n = 2): r_i − the other one
    _close(reference.rloo_advantages(scores[:4], 4), [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    _close(reference.rloo_advantages(scores, 2), [1 - 2, 2 - 1, 3 - 6, 6 - 3, 0 - 4, 4 - 0])


def _whitened(values):
    values = torch.tensor(values, dtype=torch.float64)
    return ((values - values.mean()) / torch.sqrt(values.var(unbiased=True) + 1e-8)).tolist()


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_reinforce_pp_discounted_returns_whitened_over_the_batch(gamma):
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    rewards = torch.tensor([[0.0, -0.1, -0.1, 0.9], [0.0, 0.0, -0.2, 0.5]])
    row0 = [0.9]
    for r in (-0.1, -0.1):
        row0.insert(0, r + gamma * row0[0])
    row1 = [-0.2 + gamma * 0.5, 0.5]
    flat = _whitened(row0 + row1)
    want = [[0.0, *flat[:3]], [0.0, 0.0, *flat[3:]]]
    _close(reference.reinforce_pp_advantages(rewards, mask, gamma), want)


def test_reinforce_pp_return_runs_through_a_masked_token_inside_the_response():
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    rewards = torch.tensor([[0.0, 7.0, 1.0], [0.0, 0.0, -1.0]])  # the masked 7.0 is not a reward
    flat = _whitened([0.25, 1.0, -0.25, -0.5, -1.0])  # γ = 0.5: row 0's t0 sees the t2 reward through t1
    _close(reference.reinforce_pp_advantages(rewards, mask, 0.5), [[flat[0], 0.0, flat[1]], flat[2:]])


def test_reinforce_pp_baseline_centres_by_group_then_whitens_tokens():
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    got = reference.reinforce_pp_baseline_advantages(torch.tensor([1.0, 3.0]), mask, 2)
    flat = _whitened([-1.0, -1.0, -1.0, 1.0])  # centred scores −1 and 1 on each of the rows' tokens
    _close(got, [flat[:3], [0.0, 0.0, flat[3]]])


@pytest.mark.parametrize("call", [
    lambda s: reference.grpo_advantages(s, 1),
    lambda s: reference.grpo_advantages(s, 4),  # 6 rows are not groups of 4
    lambda s: reference.rloo_advantages(s, 4),
    lambda s: reference.reinforce_pp_baseline_advantages(s, torch.ones(6, 2), 4),
])
def test_group_sizes_that_do_not_fit_the_batch_are_refused(call):
    with pytest.raises(ValueError, match="group_size"):
        call(torch.arange(6.0))


def test_an_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="scale_rewards"):
        reference.grpo_advantages(torch.arange(4.0), 2, "token")


def test_bf16_scores_give_float32_advantages():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.bfloat16)
    assert reference.grpo_advantages(scores, 2).dtype == torch.float32
    assert reference.rloo_advantages(scores, 2).dtype == torch.float32
