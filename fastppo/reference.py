"""Eager PyTorch versions of every fastppo op: the readable statement of the math.

These are the fallback backend, the oracle the kernels are tested against, and the
baseline the benchmarks time. They follow TRL 0.11's classic PPOTrainer to float
tolerance. Shapes: B = batch, T = (padded) sequence, V = vocabulary. Every result is
float32 whatever the input dtype; masks may be bool, integer or float.
"""

from __future__ import annotations

from typing import Optional

import torch

from .linear_logprobs_reference import linear_logprobs  # noqa: F401 (its chunked autograd in a module of its own)
from .op_outputs import (  # the loss kernel returns the same record
    LOSS_AGGREGATIONS,
    PPOLossOutput,
    PPOLossSettings,
    clip_bounds,
    resolve_settings,
)

KL_ESTIMATORS = ("kl", "abs", "mse", "full", "k3")


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False,
    inplace_backward: bool = False,
):
    """log softmax(logits / temperature)[label] per position.

    logits `[..., V]` (any float dtype), labels `[...]` int → float32 `[...]`; with
    `return_entropy`, also the entropy of softmax(logits / temperature), float32 `[...]`.
    `inplace_backward` is the kernel's memory option; autograd's log_softmax ignores it.
    """
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    picked = torch.gather(logp, -1, labels.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return picked
    # H = logsumexp(z) - Σ p·z, the same form as TRL's entropy_from_logits.
    entropy = torch.logsumexp(scaled, dim=-1) - (torch.softmax(scaled, dim=-1) * scaled).sum(-1)
    return picked, entropy


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per position, p = softmax(logits), q = softmax(ref_logits).

    Two `[..., V]` → float32 `[...]`.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate from sampled-token log-probs `[B, T]` → `[B, T]`.

    kl: logp − ref; abs: |logp − ref|; mse: ½(logp − ref)²;
    k3: exp(ref − logp) − 1 − (ref − logp) (unbiased, never negative).
    """
    diff = logprobs.float() - ref_logprobs.float()
    if estimator == "kl":
        return diff
    if estimator == "abs":
        return diff.abs()
    if estimator == "mse":
        return 0.5 * diff.square()
    if estimator == "k3":
        log_ratio = -diff
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r} ('full' needs precomputed kl)")


KL_LOSS_TYPES = ("k1", "k2", "k3")
K3_LOG_RATIO_LIMIT = 20.0  # |ref − logp| beyond this is clamped in k3: e^20 ≈ 5e8 stays finite in float32


def kl_loss_terms(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimates for a KL loss `[B, T]`, differentiable in `logprobs` (the reference's
    are constants): k1 = logp − ref; k2 = ½(logp − ref)²; k3 = e^r − r − 1 with r = ref − logp clamped to
    ±K3_LOG_RATIO_LIMIT (no gradient past the clamp). Elementwise, then one masked mean: no kernel of its own."""
    diff = logprobs.float() - ref_logprobs.float()
    if kl_type == "k1":
        return diff
    if kl_type == "k2":
        return 0.5 * diff.square()
    if kl_type == "k3":
        log_ratio = (-diff).clamp(-K3_LOG_RATIO_LIMIT, K3_LOG_RATIO_LIMIT)
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_type must be one of {KL_LOSS_TYPES}, got {kl_type!r}")


def kl_penalty_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    kl_coef: float,
    estimator: str = "kl",
    kl: Optional[torch.Tensor] = None,
):
    """Per-token rewards: −kl_coef·kl_t on response tokens, plus the row's score at its last one.

    logprobs, ref_logprobs, mask `[B, T]`, scores `[B]` → (rewards `[B, T]`, kl `[B, T]`), float32.
    `estimator="full"` takes the exact per-token KL in `kl` (from `full_kl`). Rewards are zero
    off the mask; a fully masked row gets no score. kl is returned unmasked, as TRL does.
    """
    if estimator == "full":
        if kl is None:
            raise ValueError("kl_penalty_rewards(estimator='full') needs kl= from full_kl")
        kl = kl.float()
    else:
        kl = kl_estimate(logprobs, ref_logprobs, estimator)
    maskf = mask.float()
    rewards = -kl_coef * kl * maskf
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).amax(-1)  # [B], -1 for an empty row
    has_token = last >= 0  # an empty row gets no score (added as 0 at column 0: no boolean index, no host read)
    rewards.scatter_add_(1, last.clamp(min=0)[:, None], torch.where(has_token, scores.float(), 0.0)[:, None])
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation, the plain reverse loop over T (TRL-classic semantics).

    rewards, values, mask `[B, T]` → (advantages, returns) `[B, T]` float32. Values and
    rewards are zeroed off the mask first, so the value after a response's last token is 0.
    returns = advantages + values.
    """
    maskf = mask.float()
    values = values.float() * maskf
    rewards = rewards.float() * maskf
    length = rewards.shape[-1]
    last_gae = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # δ_t = r_t + γV_{t+1} − V_t
        last_gae = delta + gamma * lam * last_gae  # A_t = δ_t + γλA_{t+1}
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=-1)
    return advantages, advantages + values


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is set (0-d float32)."""
    maskf = mask.float()
    return (values.float() * maskf).sum() / maskf.sum()


def masked_means(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[k]`: the masked mean of each of `stacked`'s k `mask`-shaped terms (`[k, *mask.shape]`), as k `masked_mean`s
    in a few ops."""
    maskf = mask.float()
    return (stacked.float() * maskf).sum(tuple(range(1, stacked.dim()))) / maskf.sum()


def masked_vars(stacked: torch.Tensor, mask: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """`[k]`: `masked_var` (unbiased) of each of `stacked`'s k terms, given their masked `means` `[k]`."""
    maskf = mask.float()
    count = maskf.sum()
    centered = stacked.float() - means.reshape(-1, *([1] * mask.dim()))
    variances = (centered.square() * maskf).sum(tuple(range(1, stacked.dim()))) / count
    return variances * _bessel(count)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked positions; Bessel-corrected when `unbiased` and more than one position.

    TRL divides by zero for a single position; here one position gives the biased (zero) variance.
    """
    maskf = mask.float()
    centered = values.float() - masked_mean(values, mask)
    count = maskf.sum()
    variance = (centered.square() * maskf).sum() / count
    return variance * _bessel(count) if unbiased else variance


def _bessel(count: torch.Tensor) -> torch.Tensor:
    """Bessel's n/(n − 1) for n masked positions; 1 for a single one (its variance stays the biased zero)."""
    return count / (count - 1).clamp_min(1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values − mean)/sqrt(var + 1e-8) with masked statistics; `shift_mean=False` adds the mean back."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values.float() - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# --------------------------------------------------------------------------- critic-free advantages
# The group statistics are a [B] computation (a few hundred scores): PyTorch, no kernel, on every backend.

SCALE_REWARDS = ("group", "batch", "none")
GROUP_STD_EPS = 1e-6  # outside the square root, as veRL's GRPO


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[B]` scores → `[B / n, n]`: consecutive rows are a group (what `generate(num_return_sequences=n)` returns)."""
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"group_size must be at least 2 and divide the batch ({scores.shape[0]} rows), "
                         f"got {group_size}")
    return scores.float().reshape(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's per-response advantage `[B]`: A_i = (r_i − mean_g) / (std_g + 1e-6), std Bessel-corrected (n − 1).

    `scale_rewards`: "group" (the std of the response's group), "batch" (the std of all B scores), "none" (Dr.
    GRPO: A_i = r_i − mean_g). A group whose scores are all equal gets 0 (its numerator is 0)."""
    grouped = _groups(scores, group_size)
    centered = grouped - grouped.mean(-1, keepdim=True)
    if scale_rewards == "group":
        centered = centered / (grouped.std(-1, keepdim=True) + GROUP_STD_EPS)
    elif scale_rewards == "batch":
        centered = centered / (grouped.std() + GROUP_STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    return centered.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's leave-one-out advantage `[B]`: A_i = r_i − mean_{j≠i} r_j = (r_i − mean_g)·n/(n − 1); no scaling."""
    grouped = _groups(scores, group_size)
    return ((grouped - grouped.mean(-1, keepdim=True)) * (group_size / (group_size - 1))).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ `[B, T]`: each token's discounted return G_t = Σ_k γ^k r_{t+k} of the per-token rewards (the
    score at the last token plus the reward KL penalty), whitened over every masked token of the batch,
    (G − mean)·rsqrt(var + 1e-8), var Bessel-corrected; 0 off the mask. The return runs through masked tokens
    inside a response (veRL's loop restarts it there; the same wherever a response has no masked hole)."""
    returns, _ = gae(rewards, torch.zeros_like(rewards, dtype=torch.float32), mask, gamma, 1.0)  # λ = 1, V = 0
    return masked_whiten(returns, mask) * mask.float()


def reinforce_pp_baseline_advantages(scores: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++-baseline `[B, T]`: each response's score minus its group's mean, on every masked token, then
    whitened over those tokens as in `reinforce_pp_advantages`; 0 off the mask."""
    grouped = _groups(scores, group_size)
    centered = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)
    return masked_whiten(centered[:, None] * mask.float(), mask) * mask.float()


def loss_aggregation_weights(mask: torch.Tensor, aggregation: str, rows: Optional[int] = None,
                             length=None) -> torch.Tensor:
    """The per-token weights `[B, T]` float32 of a loss aggregation: the loss is Σ_t w_t·ℓ_t over the batch.

    With n_i the masked tokens of row i, N = Σ n_i, and R = `rows` (the number of sequences the mean runs over;
    default B — the trainer passes its mini-batch size, so gradient accumulation adds up to the backward batch):
    "token-mean" w = m/N (TRL 0.11); "seq-mean-token-mean" w = m/(R·n_i) (GRPO's original);
    "seq-mean-token-sum" w = m/R; "seq-mean-token-sum-norm" w = m/(R·L) (Dr. GRPO, as TRL's: each sequence's
    token sum over a constant L, then the mean over sequences — veRL's agg_loss leaves out the 1/R), L = `length`
    (a number or a 0-d tensor; default the longest row, max n_i). Rows with no masked token weigh 0."""
    maskf = mask.float()
    rows = mask.shape[0] if rows is None else rows
    if aggregation == "token-mean":
        return maskf / maskf.sum().clamp(min=1)
    if aggregation == "seq-mean-token-mean":
        return maskf / (maskf.sum(-1, keepdim=True).clamp(min=1) * rows)
    if aggregation == "seq-mean-token-sum":
        return maskf / rows
    if aggregation == "seq-mean-token-sum-norm":
        if length is None:
            length = maskf.sum(-1).amax().clamp(min=1) if mask.numel() else 1.0
        return maskf / (rows * length)
    raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {aggregation!r}")


def aggregate(terms: torch.Tensor, mask: torch.Tensor, loss_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """A loss's 0-d aggregate of per-token `terms`: Σ m·w·terms with `loss_weights`, else the masked token mean."""
    if loss_weights is None:
        return masked_mean(terms, mask)
    return (terms.float() * mask.float() * loss_weights.float()).sum()


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's per-response log importance ratio `[B]`: the mean of (logp − old) over the row's masked tokens (0 for
    a row with none), detached: the sequence ratio exp(·) is a constant of the loss."""
    maskf = mask.float()
    log_ratio = (logprobs.detach().float() - old_logprobs.float()) * maskf
    return log_ratio.sum(-1) / maskf.sum(-1).clamp(min=1)


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange=None,
    cliprange_value: Optional[float] = None,
    vf_coef: Optional[float] = None,
    dual_clip: Optional[float] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    rollout_is_cap: Optional[float] = None,
    *,
    settings: Optional[PPOLossSettings] = None,
    loss_weights: Optional[torch.Tensor] = None,
) -> PPOLossOutput:
    """Clipped PPO policy loss + clipped value loss over masked `[B, T]` tokens.

    The scalar options come as `cliprange, cliprange_value, vf_coef, dual_clip, rollout_is_cap` or as one
    `settings=PPOLossSettings(...)` (which also holds `importance_sampling_level`). Gradients flow to `logprobs`
    and `values`; the other inputs are constants. `cliprange`: ε, the
    ratio clipped to [1 − ε, 1 + ε], or a pair `(low, high)`: [1 − low, 1 + high] (DAPO's clip-higher
    when high > low; `pg_clipfrac` counts the tokens clipped on either side). `dual_clip`
    = c > 1 (dual-clip PPO, Ye et al. 2020, veRL's clip_ratio_c): where the advantage is
    negative the token's policy loss is at most −A·c, so a huge ratio cannot blow it up.
    `rollout_logprobs` `[B, T]` (any float dtype): each token's log-prob under the engine that
    sampled it (e.g. vLLM). Given, each token's policy loss (after the clip and the dual clip) is
    multiplied by the truncated importance weight w = min(exp(old − rollout), rollout_is_cap), a
    constant, correcting for the sampler's mismatch with the trained policy; the mean still
    divides by Σm. None (the default) is the loss without it, and the two tis_* stats are None.
    `importance_sampling_level="sequence"` (GSPO): each token's ratio is r_t = s_i·π_t/sg(π_t) with
    s_i = exp(`sequence_log_ratio`) of its response (detached), so the value is s_i on every token — clipped
    per sequence — and dr_t/dlogp_t = s_i. `loss_weights` `[B, T]` (`loss_aggregation_weights`): pg_loss and
    vf_loss are Σ m·w·ℓ instead of the masked token means (TRL's, w = 1/Σm). The statistics stay token means.
    """
    settings = resolve_settings(settings, cliprange, cliprange_value, vf_coef, dual_clip, rollout_is_cap)
    logprobs, values = logprobs.float(), values.float()
    old_logprobs, old_values = old_logprobs.float(), old_values.float()
    advantages, returns = advantages.float(), returns.float()

    cliprange_value = settings.cliprange_value
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses_unclipped = (values - returns).square()
    vf_losses_clipped = (values_clipped - returns).square()
    vf_loss = 0.5 * aggregate(torch.maximum(vf_losses_unclipped, vf_losses_clipped), mask, loss_weights)

    log_ratio = logprobs - old_logprobs
    if settings.importance_sampling_level == "sequence":
        ratio = torch.exp(logprobs - logprobs.detach() + sequence_log_ratio(logprobs, old_logprobs, mask)[:, None])
    else:
        ratio = torch.exp(log_ratio)
    pg_losses_unclipped = -advantages * ratio
    low, high = clip_bounds(settings.cliprange)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    pg_losses = torch.maximum(pg_losses_unclipped, pg_losses_clipped)
    held = torch.zeros_like(pg_losses)
    if settings.dual_clip is not None:
        pg_losses_lower = -advantages * settings.dual_clip
        negative = advantages < 0
        held = (negative & (pg_losses > pg_losses_lower)).float()
        pg_losses = torch.where(negative, torch.minimum(pg_losses, pg_losses_lower), pg_losses)
    tis = {}
    if rollout_logprobs is not None:
        cap = settings.rollout_is_cap
        with torch.no_grad():
            is_ratio = torch.exp(old_logprobs - rollout_logprobs.float())
            tis_weight = torch.clamp(is_ratio, max=cap)  # w = min(exp(old − rollout), cap)
            tis = dict(tis_weight_mean=masked_mean(tis_weight, mask),
                       tis_clipfrac=masked_mean((is_ratio > cap).float(), mask))
        pg_losses = pg_losses * tis_weight  # after the clip and the dual clip: it weights the token's loss
    pg_loss = aggregate(pg_losses, mask, loss_weights)

    with torch.no_grad():  # the statistics: token means, all in one masked mean
        (vf_clipfrac, pg_clipfrac, pg_clipfrac_lower, approxkl, policykl, ratio_mean, vpred_mean,
         value_error) = masked_means(torch.stack([
             (vf_losses_clipped > vf_losses_unclipped).float(), (pg_losses_clipped > pg_losses_unclipped).float(),
             held, 0.5 * log_ratio.square(), -log_ratio, ratio, values, (values - returns).square()]), mask).unbind()

    return PPOLossOutput(
        loss=pg_loss + settings.vf_coef * vf_loss,
        pg_loss=pg_loss,
        vf_loss=vf_loss,
        pg_clipfrac=pg_clipfrac.detach(),
        vf_clipfrac=vf_clipfrac.detach(),
        approxkl=approxkl,
        policykl=policykl,
        ratio_mean=ratio_mean,
        vpred_mean=vpred_mean,
        value_error=value_error,
        ratio=ratio.detach(),
        pg_clipfrac_lower=pg_clipfrac_lower.detach(),
        **tis,
    )
