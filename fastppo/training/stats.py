"""The statistics `PPOTrainer.step` returns, under TRL 0.11's keys and with its averaging.

Per mini-batch values are token-weighted means; `ppo/*` is their unweighted mean over
(epoch, mini-batch); `ppo/val/var_explained` is computed after that averaging. Statistics TRL
does not have are fastppo's own, under `fastppo/` (a mini-batch statistic keeps that prefix
instead of taking `ppo/`). Scalars come back as Python floats, distributions as numpy arrays.
"""

from __future__ import annotations

import contextlib
import time

import warnings
from typing import Optional

import numpy as np
import torch

from .. import ops, reference, sharding
from ..op_outputs import PPOLossOutput
from .profiling import profiler_range


def minibatch_stats(
    out: PPOLossOutput,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor,
    mask: torch.Tensor,
    vf_coef: float,
    critic: bool = True,
) -> dict:
    """One mini-batch's statistics (tensors, still on device; TRL's keys without the `ppo/` prefix, and
    fastppo's own under `fastppo/`)."""
    # the masked token means (and two variances) of the mini-batch's tensors, in a few ops
    tracked = [entropy, advantages] + ([returns, old_values] if critic else [])
    stacked = torch.stack([tensor.detach().float() for tensor in tracked])
    means = reference.masked_means(stacked, mask)
    stats = {
        "loss/policy": out.pg_loss.detach(),
        "loss/value": out.vf_loss.detach(),
        "loss/total": (out.pg_loss + vf_coef * out.vf_loss).detach(),
        "policy/entropy": means[0],
        "policy/approxkl": out.approxkl,
        "policy/policykl": out.policykl,
        "policy/clipfrac": out.pg_clipfrac,
        "fastppo/policy/clipfrac_lower": out.pg_clipfrac_lower,  # dual clip only; 0 without it
        "policy/advantages": torch.nan_to_num(advantages.detach().flatten(), nan=-1.0),
        "policy/advantages_mean": means[1],
        "policy/ratio": out.ratio.flatten(),
    }
    if critic:  # critic-free: no values, no returns to report (ppo/loss/value stays, 0)
        variances = reference.masked_vars(stacked[2:], mask, means[2:])
        stats.update({
            "returns/mean": means[2],
            "returns/var": variances[0],
            "val/vpred": out.vpred_mean,
            "val/error": out.value_error,
            "val/clipfrac": out.vf_clipfrac,
            "val/mean": means[3],
            "val/var": variances[1],
        })
    if out.kl_loss is not None:  # PPOConfig.kl_loss_coef > 0 (ppo/loss/total stays TRL's: pg + vf_coef·vf)
        stats["fastppo/loss/kl"] = out.kl_loss.detach()
    if out.tis_weight_mean is not None:  # rollout_correction="tis"
        stats["fastppo/policy/tis_weight_mean"] = out.tis_weight_mean
        stats["fastppo/policy/tis_clipfrac"] = out.tis_clipfrac
    return stats


DISTRIBUTION_KEYS = ("policy/advantages", "policy/ratio")


def stack_minibatch_stats(per_minibatch: list) -> dict:
    """Each scalar's values over mini-batches `[n]`; each distribution's concatenated as one row `[1, N]`:
    TRL's layout of `train_stats`, whose mean along the first dim is the step's statistic."""
    stacked = {}
    for key in per_minibatch[0]:
        values = [stats[key] for stats in per_minibatch]
        stacked[key] = torch.cat(values)[None] if key in DISTRIBUTION_KEYS else torch.stack(values)
    return stacked


def step_stats(
    *,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kls: torch.Tensor,
    kl_coef: float,
    mask: torch.Tensor,
    query_lengths: list,
    response_lengths: list,
    train_stats: dict,
    non_score_reward: Optional[torch.Tensor] = None,
) -> dict:
    """The `objective/*`, `ppo/*` and `tokens/*` statistics of one step (tensors and numbers).
    `non_score_reward` `[B, T]` defaults to −kl_coef · kls."""
    maskf = mask.float()
    kl_per_row = (kls * maskf).sum(-1)
    stats = {
        "objective/kl": kl_per_row.mean(),
        "objective/kl_dist": kl_per_row,
        "objective/logprobs": logprobs,
        "objective/ref_logprobs": ref_logprobs,
        "objective/kl_coef": kl_coef,
        # TRL's "entropy" is the summed negative log-prob of the sampled tokens per row.
        "objective/entropy": (-logprobs * maskf).sum(-1).mean(),
        "ppo/mean_non_score_reward": ops.masked_mean(-kl_coef * kls if non_score_reward is None else non_score_reward,
                                                     mask),
        "ppo/mean_scores": scores.mean(),
        "ppo/std_scores": _std(scores),
    }
    for name, lengths in (("queries", query_lengths), ("responses", response_lengths)):  # host lists: no read
        lengths = np.asarray(lengths, dtype=np.float32)
        stats[f"tokens/{name}_len_mean"] = float(lengths.mean())
        stats[f"tokens/{name}_len_std"] = float(lengths.std(ddof=1)) if lengths.size > 1 else 0.0
        stats[f"tokens/{name}_dist"] = lengths
    for key, value in train_stats.items():
        stats[key if key.startswith("fastppo/") else f"ppo/{key}"] = value
    if "ppo/val/error" in stats:  # (not critic-free)
        stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
    return stats


def rollout_mismatch_stats(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the training forward's log-probs `[B, T]` are from the rollout engine's, over masked tokens.

    `rollout/logprob_diff_mean` and `_max`: |logp_train − logp_rollout|; `rollout/kl`: the k3
    estimate of KL(rollout ‖ train) from the rollout's own samples, mean of r − 1 − log r with
    r = exp(logp_train − logp_rollout) (≥ 0 per token).
    """
    log_ratio = logprobs.float() - rollout_logprobs.float()
    diff = log_ratio.abs()
    return {
        "rollout/logprob_diff_mean": ops.masked_mean(diff, mask),
        "rollout/logprob_diff_max": torch.where(mask.bool(), diff, torch.zeros_like(diff)).max(),
        "rollout/kl": ops.masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
    }


MAX_KEYS = ("rollout/logprob_diff_max",)  # reduced across processes by max, every other scalar by mean


def _std(values: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation; 0 for a single value (where TRL reports NaN)."""
    return values.float().std() if values.numel() > 1 else torch.zeros((), device=values.device)


def to_python(stats: dict) -> dict:
    """Tensors → numpy; 0-d and one-element arrays → float (as TRL does for non-wandb loggers). Every tensor
    goes to the host in one copy: one host read for all the statistics."""
    tensors = {key: value.detach() for key, value in stats.items() if isinstance(value, torch.Tensor)}
    host = {}
    if tensors:
        device = next(iter(tensors.values())).device
        flat = torch.cat([value.float().reshape(-1).to(device) for value in tensors.values()])
        parts = np.split(flat.cpu().numpy(), np.cumsum([value.numel() for value in tensors.values()])[:-1])
        host = {key: part.reshape(value.shape) for (key, value), part in zip(tensors.items(), parts)}
    out = {}
    for key, value in stats.items():
        value = host.get(key, value)
        if isinstance(value, np.ndarray) and value.size == 1 and value.ndim <= 1:
            value = float(value.reshape(()))
        elif isinstance(value, (np.floating, np.integer)):
            value = float(value)
        out[key] = value
    return out


def warn_if_negative_kl(mean_kl: float) -> None:
    """TRL's warning when the mean KL to the reference is below -1."""
    if mean_kl < -1.0:
        warnings.warn(f"the mean KL to the reference is negative ({mean_kl:.2f}): often a sign of generation "
                      "kwargs that sample differently from the policy's distribution (top-k, temperature, "
                      "min_length), or of unstable training")


def reduce_across_processes(stats: dict, accelerator) -> dict:
    """Mean of every scalar tensor statistic over processes (no-op on one process)."""
    if sharding.world_size(accelerator) <= 1:
        return stats
    reduced = dict(stats)
    for key, value in stats.items():
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            reduced[key] = accelerator.reduce(value.to(accelerator.device).float(),
                                              "max" if key in MAX_KEYS else "mean")
    return reduced


@contextlib.contextmanager
def timed(timing: dict, key: str, range_name: str):
    """`timing[key]`: the wall-clock seconds the block took; the block is also a torch.profiler range
    (`bench/tools/profile_step.py` reads them)."""
    start = time.time()
    with profiler_range(range_name):
        yield
    timing[key] = time.time() - start
