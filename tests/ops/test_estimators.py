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


# --------------------------------------------------------------------------- loss aggregations


@pytest.mark.parametrize("aggregation,want", [
    ("token-mean", [[1 / 4, 0, 0], [1 / 4, 1 / 4, 1 / 4]]),  # 4 tokens
    ("seq-mean-token-mean", [[1 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6]]),  # (1/n_i) / 2 rows
    ("seq-mean-token-sum", [[1 / 2, 0, 0], [1 / 2, 1 / 2, 1 / 2]]),  # 1 / 2 rows
    ("seq-mean-token-sum-norm", [[1 / 6, 0, 0], [1 / 6, 1 / 6, 1 / 6]]),  # 1 / (2 rows × the longest, 3)
])
def test_aggregation_weights_of_rows_of_one_and_three_tokens(aggregation, want):
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    _close(reference.loss_aggregation_weights(mask, aggregation), want)


def test_aggregation_weights_over_more_rows_and_a_given_length():
    """`rows`: the sequences the mean runs over (the trainer's mini-batch, of which these rows are a part);
    `length`: Dr. GRPO's constant. A row with no token weighs nothing."""
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    _close(reference.loss_aggregation_weights(mask, "seq-mean-token-mean", rows=4), [[1 / 8, 1 / 8, 0], [0, 0, 0]])
    _close(reference.loss_aggregation_weights(mask, "seq-mean-token-sum-norm", rows=4, length=10),
           [[1 / 40, 1 / 40, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="loss_aggregation must be one of"):
        reference.loss_aggregation_weights(mask, "sum")


def test_the_weighted_loss_is_the_aggregation_written_out():
    """Σ w·ℓ equals each mode's formula on a ragged batch (lengths 2, 5, 1)."""
    generator = torch.Generator().manual_seed(0)
    terms = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for row, n in enumerate((2, 5, 1)):
        mask[row, :n] = True
    m, n = mask.double(), mask.double().sum(-1)
    written = {"token-mean": (terms * m).sum() / m.sum(), "seq-mean-token-mean": ((terms * m).sum(-1) / n).mean(),
               "seq-mean-token-sum": (terms * m).sum(-1).mean(),
               "seq-mean-token-sum-norm": ((terms * m).sum(-1) / 5).mean()}
    for aggregation, want in written.items():
        got = reference.aggregate(terms, mask, reference.loss_aggregation_weights(mask, aggregation))
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-7, msg=aggregation)


def test_gspo_sequence_log_ratio_is_the_masked_row_mean():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.5, -2.5, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    _close(reference.sequence_log_ratio(logp, old, mask), [0.5, 0.0])  # an empty row: ratio exp(0) = 1
