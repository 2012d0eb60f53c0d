"""Eager PyTorch versions of every fastppo op: the readable statement of the math.

These are the fallback backend, the oracle the kernels are tested against, and the
baseline the benchmarks time. They follow TRL 0.11's classic PPOTrainer to float
tolerance. Shapes: B = batch, T = (padded) sequence, V = vocabulary. Every result is
float32 whatever the input dtype; masks may be bool, integer or float.
"""

from __future__ import annotations

from typing import Optional

import torch

from .op_outputs import PPOLossOutput, clip_bounds  # the loss kernel returns the same record

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


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked positions; Bessel-corrected when `unbiased` and more than one position.

    TRL divides by zero for a single position; here one position gives the biased (zero) variance.
    """
    maskf = mask.float()
    centered = values.float() - masked_mean(values, mask)
    variance = (centered.square() * maskf).sum() / maskf.sum()
    if unbiased:
        count = maskf.sum()
        variance = variance * torch.where(count > 1, count / (count - 1).clamp_min(1), torch.ones_like(count))
    return variance


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


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange,
    cliprange_value: float,
    vf_coef: float,
    dual_clip: Optional[float] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    rollout_is_cap: float = 2.0,
) -> PPOLossOutput:
    """Clipped PPO policy loss + clipped value loss, masked means over `[B, T]`.

    Gradients flow to `logprobs` and `values`; the other inputs are constants. `cliprange`: ε, the
    ratio clipped to [1 − ε, 1 + ε], or a pair `(low, high)`: [1 − low, 1 + high] (DAPO's clip-higher
    when high > low; `pg_clipfrac` counts the tokens clipped on either side). `dual_clip`
    = c > 1 (dual-clip PPO, Ye et al. 2020, veRL's clip_ratio_c): where the advantage is
    negative the token's policy loss is at most −A·c, so a huge ratio cannot blow it up.
    `rollout_logprobs` `[B, T]` (any float dtype): each token's log-prob under the engine that
    sampled it (e.g. vLLM). Given, each token's policy loss (after the clip and the dual clip) is
    multiplied by the truncated importance weight w = min(exp(old − rollout), rollout_is_cap), a
    constant, correcting for the sampler's mismatch with the trained policy; the mean still
    divides by Σm. None (the default) is the loss without it, and the two tis_* stats are None.
    """
    logprobs, values = logprobs.float(), values.float()
    old_logprobs, old_values = old_logprobs.float(), old_values.float()
    advantages, returns = advantages.float(), returns.float()

    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses_unclipped = (values - returns).square()
    vf_losses_clipped = (values_clipped - returns).square()
    vf_loss = 0.5 * masked_mean(torch.maximum(vf_losses_unclipped, vf_losses_clipped), mask)
    vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses_unclipped).float(), mask)

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses_unclipped = -advantages * ratio
    low, high = clip_bounds(cliprange)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    pg_losses = torch.maximum(pg_losses_unclipped, pg_losses_clipped)
    pg_clipfrac = masked_mean((pg_losses_clipped > pg_losses_unclipped).float(), mask)
    held = torch.zeros_like(pg_losses)
    if dual_clip is not None:
        pg_losses_lower = -advantages * dual_clip
        negative = advantages < 0
        held = (negative & (pg_losses > pg_losses_lower)).float()
        pg_losses = torch.where(negative, torch.minimum(pg_losses, pg_losses_lower), pg_losses)
    tis = {}
    if rollout_logprobs is not None:
        with torch.no_grad():
            is_ratio = torch.exp(old_logprobs - rollout_logprobs.float())
            tis_weight = torch.clamp(is_ratio, max=rollout_is_cap)  # w = min(exp(old − rollout), cap)
            tis = dict(tis_weight_mean=masked_mean(tis_weight, mask),
                       tis_clipfrac=masked_mean((is_ratio > rollout_is_cap).float(), mask))
        pg_losses = pg_losses * tis_weight  # after the clip and the dual clip: it weights the token's loss
    pg_loss = masked_mean(pg_losses, mask)
    pg_clipfrac_lower = masked_mean(held, mask)

    with torch.no_grad():
        approxkl = 0.5 * masked_mean(log_ratio.square(), mask)
        policykl = masked_mean(-log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
        vpred_mean = masked_mean(values, mask)
        value_error = masked_mean((values - returns).square(), mask)

    return PPOLossOutput(
        loss=pg_loss + vf_coef * vf_loss,
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


# --------------------------------------------------------------------------- linear log-probs


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`[C, V]` logits of one chunk: the matmul in the input dtype (as the model's lm_head), then float32."""
    return torch.nn.functional.linear(hidden, weight, bias).float()


class _LinearLogprobs(torch.autograd.Function):
    """Chunked linear log-probs: saves hidden, weight, bias, labels, the float32 LSE `[N]` (and
    entropy); the backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, return_entropy, chunk_size):
        logps, entropies, lses = [], [], []
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            scaled = _chunk_logits(hidden[rows], weight, bias).div_(temperature)  # y = z / T, [C, V]
            lse = torch.logsumexp(scaled, dim=-1)
            logp_all = scaled.sub_(lse.unsqueeze(-1))  # log p, ≤ 0 (in place: one [C, V] float32 tile fewer)
            logps.append(logp_all.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1))
            lses.append(lse)
            if return_entropy:
                entropies.append(_entropy(logp_all))
        empty = hidden.new_zeros(0, dtype=torch.float32)
        logp = torch.cat(logps) if logps else empty
        lse = torch.cat(lses) if lses else empty
        entropy = (torch.cat(entropies) if entropies else empty) if return_entropy else None
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        from fastppo.kernels._launch import linear_logprobs_backward_tiles  # pure Python: needs no triton

        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        temperature = ctx.temperature
        split, tiles = linear_logprobs_backward_tiles(hidden.shape[0], weight.shape[0], ctx.chunk_size)
        # The operand whose gradient sums over tiles (weight and bias across token chunks, hidden
        # across vocabulary tiles) accumulates in float32 and is rounded once at the end.
        sum_hidden = split == "vocab" and len(tiles) > 1
        sum_weight = split == "tokens" and len(tiles) > 1

        def zeros(leaf, needed, summed):  # written once (zeros + x is exact) or summed in float32
            return torch.zeros_like(leaf, dtype=torch.float32 if summed else leaf.dtype) if needed else None

        grad_hidden = zeros(hidden, needs_hidden, sum_hidden)
        grad_weight = zeros(weight, needs_weight, sum_weight)
        grad_bias = zeros(bias, needs_bias, sum_weight)
        for rows, cols in tiles:
            # y = z / T and log p on this tile, from the saved per-row log-sum-exp. In-place steps keep
            # three float32 tiles alive at most (log p, p, the gradient), not seven: the same values.
            logp_tile = _chunk_logits(hidden[rows], weight[cols], bias[cols] if bias is not None else None)
            logp_tile.div_(temperature).sub_(lse[rows].unsqueeze(-1))
            p = logp_tile.exp()
            if grad_logp is not None:  # ∂logp/∂y = onehot − p: g·(0 − p) off the label, g·(1 − p) on it
                g = grad_logp[rows].float().unsqueeze(-1)
                grad_scaled = p.mul(g).neg_()
                local = (labels[rows] - cols.start).unsqueeze(-1)
                inside = (local >= 0) & (local < cols.stop - cols.start)
                local = local.clamp(0, cols.stop - cols.start - 1)
                on_label = g * (1.0 - p.gather(-1, local))
                grad_scaled.scatter_(-1, local, torch.where(inside, on_label, grad_scaled.gather(-1, local)))
            else:
                grad_scaled = torch.zeros_like(p)
            if grad_entropy is not None:  # ∂H/∂y = −p·(log p + H); p = 0 contributes 0
                term = logp_tile.add_(entropy[rows].unsqueeze(-1)).mul_(p).masked_fill_(~(p > 0), 0.0)
                grad_scaled.sub_(term.mul_(grad_entropy[rows].float().unsqueeze(-1)))
            del logp_tile, p
            # ∂L/∂z in the logits' dtype, as the logprobs op hands it to the lm_head's backward
            grad_logits = grad_scaled.div_(temperature).to(hidden.dtype)
            del grad_scaled
            if needs_hidden:
                grad_hidden[rows] += grad_logits @ weight[cols]
            if needs_weight:
                grad_weight[cols] += grad_logits.t() @ hidden[rows]
            if needs_bias:
                grad_bias[cols] += grad_logits.sum(0, dtype=torch.float32)
        grad_hidden = grad_hidden.to(hidden.dtype) if needs_hidden else None
        grad_weight = grad_weight.to(weight.dtype) if needs_weight else None
        grad_bias = grad_bias.to(bias.dtype) if needs_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _entropy(logp_all: torch.Tensor) -> torch.Tensor:
    """H = −Σ p·log p over the last dim, from float32 log-probs (−inf entries contribute 0)."""
    p = logp_all.exp()
    return -torch.where(p > 0, p * logp_all, 0.0).sum(-1)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
):
    """log softmax((hidden @ weight.T + bias) / temperature)[label] per token, never holding `[N, V]` logits.

    hidden `[..., H]`, weight `[V, H]` (nn.Linear layout), labels `[...]` int, bias `[V]` or
    None, one float dtype → float32 `[...]` (≤ 0); with `return_entropy`, also the entropy
    float32 `[...]`. Tokens go `chunk_size` at a time (default: `linear_logprobs_chunk_size`,
    shared with the Triton path): each chunk's logits are the matmul in the input dtype (what
    the model's lm_head computes), upcast to float32 for the log-softmax. The backward
    recomputes the logits tile by tile (`linear_logprobs_backward_tiles`: token chunks, or
    vocabulary tiles when N ≤ V) from hidden, weight, bias and the saved float32 log-sum-exp
    and entropy `[N]`; extra memory is O(chunk_size × V) plus a float32 gradient accumulator,
    `[min(N, V), H]`. Differentiable w.r.t. hidden, weight and bias.
    """
    lead_shape, n_hidden = hidden.shape[:-1], hidden.shape[-1]
    hidden2d, labels1d = hidden.reshape(-1, n_hidden), labels.reshape(-1).long()
    if chunk_size is None:
        from fastppo.kernels._launch import linear_logprobs_chunk_size  # pure Python: needs no triton

        chunk_size = linear_logprobs_chunk_size(hidden2d.shape[0], weight.shape[0], hidden.device)
    out = _LinearLogprobs.apply(hidden2d, weight, bias, labels1d, float(temperature), return_entropy, int(chunk_size))
    if return_entropy:
        return out[0].reshape(lead_shape), out[1].reshape(lead_shape)
    return out.reshape(lead_shape)
