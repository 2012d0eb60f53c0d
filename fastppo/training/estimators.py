"""Critic-free advantages (PPOConfig.advantage_estimator other than "gae"): the one place `step` turns its
per-token rewards into advantages without a value head.

The group estimators (GRPO, RLOO, REINFORCE++-baseline) compare each response with the others of its group
(`group_size` consecutive rows, one query). A response's reward is the sum of its token rewards — its score,
plus the reward KL penalty when `init_kl_coef` > 0 (veRL sums its token-level rewards the same way); with no
reward KL it is the score. REINFORCE++ discounts the token rewards themselves. The math is in
`fastppo.reference` (`grpo_advantages`, ...).
"""

from __future__ import annotations

import torch

from .. import reference


def advantages(config, rewards: torch.Tensor, mask: torch.Tensor) -> tuple:
    """`(values, advantages, returns, {"fastppo/groups_zero_std": share})` for `config.advantage_estimator`: all
    `[B, T]`, the values and returns zeros (no critic), the advantages 0 off the mask; the share (0-d, on the
    device) is that of the groups whose rewards are all equal."""
    maskf = mask.float()
    estimator, size = config.advantage_estimator, config.group_size
    row_rewards = (rewards.float() * maskf).sum(-1)
    if estimator == "grpo":
        per_token = reference.grpo_advantages(row_rewards, size, config.scale_rewards)[:, None] * maskf
    elif estimator == "rloo":
        per_token = reference.rloo_advantages(row_rewards, size)[:, None] * maskf
    elif estimator == "reinforce_pp":
        per_token = reference.reinforce_pp_advantages(rewards, mask, config.gamma)
    elif estimator == "reinforce_pp_baseline":
        per_token = reference.reinforce_pp_baseline_advantages(row_rewards, mask, size)
    else:
        raise ValueError(f"advantage_estimator {estimator!r} is not critic-free")
    zeros = torch.zeros_like(per_token)
    return zeros, per_token, zeros, {"fastppo/groups_zero_std": _zero_std_share(row_rewards, size)}


def _zero_std_share(row_rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        return row_rewards.new_zeros(())
    grouped = row_rewards.reshape(-1, group_size)
    return (grouped == grouped[:, :1]).all(-1).float().mean()
