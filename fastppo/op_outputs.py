"""The records fastppo's ops take and return (`PPOLossSettings`, `PPOLossOutput`), shared by the eager math
(`fastppo.reference`) and its kernels.

A module of its own so that neither imports the other: `reference.py` states the math, `kernels/`
computes the same function faster, and both hand back these types. Pure Python, no triton.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .config import IMPORTANCE_SAMPLING_LEVELS, LOSS_AGGREGATIONS  # noqa: F401 (the ops' choices are the config's)


def clip_bounds(cliprange) -> tuple:
    """`(low, high)` floats of a loss's `cliprange`: ε → (ε, ε), the ratio clipped to [1 − ε, 1 + ε]; a pair
    `(low, high)` → [1 − low, 1 + high] (clip-higher)."""
    if isinstance(cliprange, (tuple, list)):
        low, high = cliprange
        return float(low), float(high)
    return float(cliprange), float(cliprange)


class PPOLossSettings(NamedTuple):
    """The scalar options of `ops.ppo_loss`, one record (the tensors stay arguments).

    `cliprange`: ε (the ratio clipped to [1 − ε, 1 + ε]) or `(low, high)` for [1 − low, 1 + high]
    (clip-higher). `cliprange_value`: the value clip. `vf_coef`: the value loss's weight in `loss`.
    `dual_clip`: c > 1 bounds negative-advantage tokens' loss at −A·c; None: no dual clip.
    `rollout_is_cap`: the cap of the truncated importance weight (used with `rollout_logprobs`).
    `importance_sampling_level`: "token" (TRL's ratio per token) or "sequence" (GSPO: every token of
    a response has the ratio exp(mean of its masked token log-ratios), a constant, with each token's
    own log-prob's gradient passed through).
    """

    cliprange: Union[float, tuple] = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    dual_clip: Optional[float] = None
    rollout_is_cap: float = 2.0
    importance_sampling_level: str = "token"


def resolve_settings(settings: Optional[PPOLossSettings], cliprange, cliprange_value, vf_coef, dual_clip,
                     rollout_is_cap) -> PPOLossSettings:
    """One `PPOLossSettings` from either the record or the separate scalars (both given: TypeError)."""
    if settings is None:
        if cliprange is None or cliprange_value is None or vf_coef is None:
            raise TypeError("ppo_loss needs cliprange, cliprange_value and vf_coef, or settings=PPOLossSettings(...)")
        return PPOLossSettings(cliprange, cliprange_value, vf_coef, dual_clip,
                               2.0 if rollout_is_cap is None else rollout_is_cap)
    if not isinstance(settings, PPOLossSettings):
        raise TypeError(f"settings must be a PPOLossSettings, got {type(settings).__name__}")
    given = [name for name, value in (("cliprange", cliprange), ("cliprange_value", cliprange_value),
                                      ("vf_coef", vf_coef), ("dual_clip", dual_clip),
                                      ("rollout_is_cap", rollout_is_cap)) if value is not None]
    if given:
        raise TypeError(f"ppo_loss got settings and {given[0]}: pass the scalars in one place, settings or arguments")
    return settings


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
