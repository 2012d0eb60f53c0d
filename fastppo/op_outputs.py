"""The records fastppo's ops return, shared by the eager math (`fastppo.reference`) and its kernels.

A module of its own so that neither imports the other: `reference.py` states the math, `kernels/`
computes the same function faster, and both hand back these types. Pure Python, no triton.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def clip_bounds(cliprange) -> tuple:
    """`(low, high)` floats of a loss's `cliprange`: ε → (ε, ε), the ratio clipped to [1 − ε, 1 + ε]; a pair
    `(low, high)` → [1 − low, 1 + high] (clip-higher)."""
    if isinstance(cliprange, (tuple, list)):
        low, high = cliprange
        return float(low), float(high)
    return float(cliprange), float(cliprange)


class PPOLossOutput(NamedTuple):
    """Losses (with gradient) and the per-mini-batch statistics step() reports (0-d float32)."""

    loss: torch.Tensor  # pg_loss + vf_coef * vf_loss
    pg_loss: torch.Tensor
    vf_loss: torch.Tensor  # 0.5 · masked mean of the clipped squared error (no vf_coef)
    pg_clipfrac: torch.Tensor
    vf_clipfrac: torch.Tensor
    approxkl: torch.Tensor  # ½ · mean (logp − old)²
    policykl: torch.Tensor  # mean (old − logp)
    ratio_mean: torch.Tensor
    vpred_mean: torch.Tensor
    value_error: torch.Tensor  # mean (v − returns)²
    ratio: torch.Tensor  # [B, T], detached
    pg_clipfrac_lower: torch.Tensor  # dual-clip: share of tokens held at −A·dual_clip (0 without it)
    # truncated importance sampling (only with rollout_logprobs, else None): mean of
    # w = min(exp(old − rollout), cap), and the share of tokens whose exp(old − rollout) exceeds the cap
    tis_weight_mean: Optional[torch.Tensor] = None
    tis_clipfrac: Optional[torch.Tensor] = None
    kl_loss: Optional[torch.Tensor] = None  # the KL loss term (before kl_loss_coef), set by the trainer when used
