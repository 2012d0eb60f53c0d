"""Clipped PPO policy + value loss, forward and backward: `fastppo.kernels.ppo_loss`.

Math (TRL classic, see `fastppo.reference.ppo_loss`), per token with weight m (the mask as
float) and N = Σm:

    r   = exp(logp − old_logp)
    pg  = max(−A·r, −A·clamp(r, 1 − ε, 1 + ε))                   pg_loss = Σm·pg / N
    (dual clip c > 1: pg = min(pg, −A·c) where A < 0; its clip fraction counts those held)
    (rollout log-probs: pg = w·pg, w = min(exp(old_logp − rollout_logp), cap), a constant:
     truncated importance sampling for tokens sampled by another engine; N stays Σm)
    v_c = clamp(v, v_old − ε_v, v_old + ε_v)
    vf  = max((v − R)², (v_c − R)²)                               vf_loss = ½·Σm·vf / N
    loss = pg_loss + vf_coef·vf_loss
    stats: clip fractions Σm·[clipped > unclipped]/N, approxkl ½Σm·(logp − old)²/N,
           policykl Σm·(old − logp)/N, ratio_mean, vpred_mean, value_error Σm·(v − R)²/N;
           with rollout log-probs tis_weight_mean Σm·w/N, tis_clipfrac Σm·[exp(old − rollout) > cap]/N.

Backward, with ḡ_pg = (g_pg + g_loss)/N and ḡ_vf = ½(g_vf + vf_coef·g_loss)/N, matching
torch autograd of the reference term by term: torch.maximum sends the gradient to the larger
argument and half to each on an exact tie (w_u, w_c below: those shares, not the importance
weight w); clamp passes it where lo ≤ x ≤ hi (inclusive):

    d/dlogp = ḡ_pg·m·(w_u·(−A) + w_c·(−A)·[1−ε ≤ r ≤ 1+ε])·r     (× the min's share, dual clip; × w)
    d/dv    = ḡ_vf·m·(w_u·2(v − R) + w_c·2(v_c − R)·[v_old − ε_v ≤ v ≤ v_old + ε_v])

Launches: forward = 1 kernel writing ratio `[B, T]` and per-program partial sums `[P, 13]`
(P ≤ MAX_TOKEN_PARTIALS, grid-stride over tiles) + 1 single-program kernel that reduces them and
writes loss, pg_loss, vf_loss and the stats (deterministic, no atomics, no host sync).
Backward = 1 kernel recomputing r (and w) from the inputs and writing both gradients.
Bytes per token (fp32 inputs, bool mask): forward reads 6·4 + 1 and writes 4 (29 bytes);
backward reads 29 and writes 8. Rollout log-probs (fp32) add a read of 4 to each: forward 37,
backward 41. Eager PyTorch needs ~40 launches forward, ~40 backward.

Shapes: all inputs `[B, T]` (rollout log-probs too), any float dtype (upcast to float32 on
load), any strides; mask bool / int / float. ratio is float32 contiguous; gradients have the
dtype of their input.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastppo.op_outputs import PPOLossOutput, clip_bounds

from . import _launch
from ._launch import check_column_offsets, device_guard, token_tiles

# Partial-sum columns, each a masked sum Σm·(...): 0 pg, 1 vf, 2 [pg clipped], 3 [vf clipped],
# 4 log_ratio², 5 −log_ratio, 6 ratio, 7 v, 8 (v − R)², 9 m, 10 [held at −A·c by the dual clip],
# 11 w, 12 [exp(old − rollout) > cap] (11, 12 stay 0 without rollout log-probs).
# Columns 2..8 and 10..12 become the 10 stats.
N_PARTIALS_COLS = 13
N_STATS = 10  # pg_clipfrac, vf_clipfrac, approxkl, policykl, ratio_mean, vpred_mean, value_error, pg_clipfrac_lower,
#               tis_weight_mean, tis_clipfrac
_INPUT_NAMES = ("logprobs", "old_logprobs", "values", "old_values", "advantages", "returns", "mask")


@triton.jit
def _load_tile(ptr, rows, cols, s_b, s_t, ok):
    return tl.load(ptr + rows[:, None] * s_b + cols[None, :] * s_t, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _ppo_loss_fwd_kernel(
    logp_ptr, old_logp_ptr, v_ptr, old_v_ptr, adv_ptr, ret_ptr,  # [B, T] any float
    mask_ptr,  # [B, T] bool / int / float
    roll_logp_ptr,  # [B, T] any float: the sampling engine's log-probs (read when ROLLOUT_IS)
    ratio_ptr,  # [B, T] float32, contiguous
    partials_ptr,  # [P, 13] float32
    B, T, n_col_tiles, n_tiles,
    s_lp_b, s_lp_t, s_olp_b, s_olp_t, s_v_b, s_v_t, s_ov_b, s_ov_t, s_a_b, s_a_t, s_r_b, s_r_t, s_m_b, s_m_t,
    s_rl_b, s_rl_t,
    clip_lo, clip_hi, cliprange_value, dual_clip, rollout_is_cap,
    DUAL_CLIP: tl.constexpr,
    ROLLOUT_IS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_pg = 0.0
    acc_vf = 0.0
    acc_pg_clip = 0.0
    acc_vf_clip = 0.0
    acc_lr_sq = 0.0
    acc_neg_lr = 0.0
    acc_ratio = 0.0
    acc_v = 0.0
    acc_verr = 0.0
    acc_n = 0.0
    acc_held = 0.0
    acc_tis_w = 0.0
    acc_tis_clip = 0.0
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        rows = (tile // n_col_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = (tile % n_col_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = (rows < B)[:, None] & (cols < T)[None, :]
        rows = rows.to(tl.int64)
        logp = _load_tile(logp_ptr, rows, cols, s_lp_b, s_lp_t, ok)
        old_logp = _load_tile(old_logp_ptr, rows, cols, s_olp_b, s_olp_t, ok)
        v = _load_tile(v_ptr, rows, cols, s_v_b, s_v_t, ok)
        old_v = _load_tile(old_v_ptr, rows, cols, s_ov_b, s_ov_t, ok)
        adv = _load_tile(adv_ptr, rows, cols, s_a_b, s_a_t, ok)
        ret = _load_tile(ret_ptr, rows, cols, s_r_b, s_r_t, ok)
        m = _load_tile(mask_ptr, rows, cols, s_m_b, s_m_t, ok)

        log_ratio = logp - old_logp
        ratio = tl.exp(log_ratio)
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
        v_clipped = tl.minimum(tl.maximum(v, old_v - cliprange_value), old_v + cliprange_value)
        err = v - ret
        vf_unclipped = err * err
        err_clipped = v_clipped - ret
        vf_clipped = err_clipped * err_clipped

        pg = tl.maximum(pg_unclipped, pg_clipped)
        if DUAL_CLIP:  # negative advantages: the token's loss is at most −A·c
            pg_lower = -adv * dual_clip
            negative = adv < 0.0
            acc_held += tl.sum(tl.where(negative & (pg > pg_lower), m, 0.0))
            pg = tl.where(negative, tl.minimum(pg, pg_lower), pg)
        if ROLLOUT_IS:  # truncated importance weight w = min(exp(old − rollout), cap), a constant
            is_ratio = tl.exp(old_logp - _load_tile(roll_logp_ptr, rows, cols, s_rl_b, s_rl_t, ok))
            tis_w = tl.minimum(is_ratio, rollout_is_cap)
            acc_tis_w += tl.sum(tis_w * m)
            acc_tis_clip += tl.sum(tl.where(is_ratio > rollout_is_cap, m, 0.0))
            pg = pg * tis_w
        acc_pg += tl.sum(pg * m)
        acc_vf += tl.sum(tl.maximum(vf_unclipped, vf_clipped) * m)
        acc_pg_clip += tl.sum(tl.where(pg_clipped > pg_unclipped, m, 0.0))
        acc_vf_clip += tl.sum(tl.where(vf_clipped > vf_unclipped, m, 0.0))
        acc_lr_sq += tl.sum(log_ratio * log_ratio * m)
        acc_neg_lr += tl.sum(-log_ratio * m)
        acc_ratio += tl.sum(ratio * m)
        acc_v += tl.sum(v * m)
        acc_verr += tl.sum(vf_unclipped * m)
        acc_n += tl.sum(m)
        tl.store(ratio_ptr + rows[:, None] * T + cols[None, :], ratio, mask=ok)
    out = partials_ptr + pid * 13
    tl.store(out + 0, acc_pg)
    tl.store(out + 1, acc_vf)
    tl.store(out + 2, acc_pg_clip)
    tl.store(out + 3, acc_vf_clip)
    tl.store(out + 4, acc_lr_sq)
    tl.store(out + 5, acc_neg_lr)
    tl.store(out + 6, acc_ratio)
    tl.store(out + 7, acc_v)
    tl.store(out + 8, acc_verr)
    tl.store(out + 9, acc_n)
    tl.store(out + 10, acc_held)
    tl.store(out + 11, acc_tis_w)
    tl.store(out + 12, acc_tis_clip)


@triton.jit
def _ppo_loss_reduce_kernel(
    partials_ptr,  # [P, 13] float32
    loss_ptr, pg_loss_ptr, vf_loss_ptr,  # [] float32
    stats_ptr,  # [10] float32: the PPOLossOutput stats in order
    count_ptr,  # [] float32: N, for the backward
    n_partials, vf_coef,
    BLOCK_P: tl.constexpr,
):
    p = tl.arange(0, BLOCK_P)
    k = tl.arange(0, 16)
    parts = tl.load(partials_ptr + p[:, None] * 13 + k[None, :], mask=(p < n_partials)[:, None] & (k < 13)[None, :],
                    other=0.0)
    sums = tl.sum(parts, axis=0)  # [16]
    n = tl.sum(tl.where(k == 9, sums, 0.0))
    means = sums / n  # NaN everywhere for an empty mask, like the reference
    pg_loss = tl.sum(tl.where(k == 0, means, 0.0))
    vf_loss = 0.5 * tl.sum(tl.where(k == 1, means, 0.0))
    tl.store(loss_ptr, pg_loss + vf_coef * vf_loss)
    tl.store(pg_loss_ptr, pg_loss)
    tl.store(vf_loss_ptr, vf_loss)
    tl.store(count_ptr, n)
    stats = tl.where(k == 4, 0.5 * means, means)  # approxkl = ½·mean(log_ratio²)
    tl.store(stats_ptr + (k - 2), stats, mask=(k >= 2) & (k < 9))
    tl.store(stats_ptr + 7 + (k - 10), stats, mask=k == 10)  # pg_clipfrac_lower
    tl.store(stats_ptr + 8 + (k - 11), stats, mask=(k >= 11) & (k < 13))  # tis_weight_mean, tis_clipfrac


@triton.jit
def _ppo_loss_bwd_kernel(
    logp_ptr, old_logp_ptr, v_ptr, old_v_ptr, adv_ptr, ret_ptr,  # [B, T] any float
    mask_ptr,  # [B, T] bool / int / float
    roll_logp_ptr,  # [B, T] any float: the sampling engine's log-probs (read when ROLLOUT_IS)
    g_loss_ptr, g_pg_ptr, g_vf_ptr,  # [] upstream gradients (read when HAS_G_*)
    count_ptr,  # [] float32: N from the forward
    dlogp_ptr,  # [B, T] dtype of logprobs, contiguous
    dv_ptr,  # [B, T] dtype of values, contiguous
    B, T, n_col_tiles,
    s_lp_b, s_lp_t, s_olp_b, s_olp_t, s_v_b, s_v_t, s_ov_b, s_ov_t, s_a_b, s_a_t, s_r_b, s_r_t, s_m_b, s_m_t,
    s_rl_b, s_rl_t,
    clip_lo, clip_hi, cliprange_value, vf_coef, dual_clip, rollout_is_cap,
    DUAL_CLIP: tl.constexpr,
    ROLLOUT_IS: tl.constexpr,
    HAS_G_LOSS: tl.constexpr, HAS_G_PG: tl.constexpr, HAS_G_VF: tl.constexpr,
    NEED_DLOGP: tl.constexpr, NEED_DV: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tile = tl.program_id(0)
    rows = (tile // n_col_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = (tile % n_col_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = (rows < B)[:, None] & (cols < T)[None, :]
    rows = rows.to(tl.int64)
    out = rows[:, None] * T + cols[None, :]

    g_loss = 0.0
    g_pg = 0.0
    g_vf = 0.0
    if HAS_G_LOSS:
        g_loss = tl.load(g_loss_ptr).to(tl.float32)
    if HAS_G_PG:
        g_pg = tl.load(g_pg_ptr).to(tl.float32)
    if HAS_G_VF:
        g_vf = tl.load(g_vf_ptr).to(tl.float32)
    n = tl.load(count_ptr)
    m = _load_tile(mask_ptr, rows, cols, s_m_b, s_m_t, ok)

    if NEED_DLOGP:
        logp = _load_tile(logp_ptr, rows, cols, s_lp_b, s_lp_t, ok)
        old_logp = _load_tile(old_logp_ptr, rows, cols, s_olp_b, s_olp_t, ok)
        adv = _load_tile(adv_ptr, rows, cols, s_a_b, s_a_t, ok)
        ratio = tl.exp(logp - old_logp)
        pg_unclipped = -adv * ratio
        pg_clipped = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
        g = ((g_pg + g_loss) / n) * m  # d pg_loss / d max(...) per token
        if ROLLOUT_IS:  # pg = w·pg with w constant: the token's gradient scales by w
            roll_logp = _load_tile(roll_logp_ptr, rows, cols, s_rl_b, s_rl_t, ok)
            g = g * tl.minimum(tl.exp(old_logp - roll_logp), rollout_is_cap)
        if DUAL_CLIP:
            # where(A < 0, minimum(max(...), −A·c), max(...)): torch.minimum sends the gradient
            # to the smaller side (half on a tie); −A·c is a constant
            pg = tl.maximum(pg_unclipped, pg_clipped)
            pg_lower = -adv * dual_clip
            share = tl.where(pg == pg_lower, 0.5, tl.where(pg < pg_lower, 1.0, 0.0))
            g = tl.where(adv < 0.0, g * share, g)
        # torch.maximum backward: all to the larger side, half each on a tie
        g_unclipped = tl.where(pg_unclipped == pg_clipped, 0.5 * g, tl.where(pg_unclipped < pg_clipped, 0.0, g))
        g_clipped = tl.where(pg_unclipped == pg_clipped, 0.5 * g, tl.where(pg_unclipped > pg_clipped, 0.0, g))
        # torch.clamp backward: passes where lo <= x <= hi
        in_range = (ratio >= clip_lo) & (ratio <= clip_hi)
        g_ratio = g_unclipped * -adv + tl.where(in_range, g_clipped * -adv, 0.0)
        tl.store(dlogp_ptr + out, g_ratio * ratio, mask=ok)

    if NEED_DV:
        v = _load_tile(v_ptr, rows, cols, s_v_b, s_v_t, ok)
        old_v = _load_tile(old_v_ptr, rows, cols, s_ov_b, s_ov_t, ok)
        ret = _load_tile(ret_ptr, rows, cols, s_r_b, s_r_t, ok)
        lo = old_v - cliprange_value
        hi = old_v + cliprange_value
        v_clipped = tl.minimum(tl.maximum(v, lo), hi)
        err = v - ret
        err_clipped = v_clipped - ret
        vf_unclipped = err * err
        vf_clipped = err_clipped * err_clipped
        g = (((g_vf + vf_coef * g_loss) * 0.5) / n) * m
        g_unclipped = tl.where(vf_unclipped == vf_clipped, 0.5 * g, tl.where(vf_unclipped < vf_clipped, 0.0, g))
        g_clipped = tl.where(vf_unclipped == vf_clipped, 0.5 * g, tl.where(vf_unclipped > vf_clipped, 0.0, g))
        in_range = (v >= lo) & (v <= hi)
        dv = g_unclipped * (2.0 * err) + tl.where(in_range, g_clipped * (2.0 * err_clipped), 0.0)
        tl.store(dv_ptr + out, dv, mask=ok)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


class _PPOLossFunction(torch.autograd.Function):
    """(logprobs, values, constants...) → (loss, pg_loss, vf_loss, stats [10], ratio [B, T])."""

    @staticmethod
    def forward(ctx, logprobs, values, old_logprobs, old_values, advantages, returns, mask,
                cliprange, cliprange_value, vf_coef, dual_clip, rollout_logprobs, rollout_is_cap):
        B, T = logprobs.shape
        device = logprobs.device
        inputs = (logprobs, old_logprobs, values, old_values, advantages, returns, mask)
        for name, tensor in zip(_INPUT_NAMES, inputs):
            check_column_offsets(tensor, name)
        if rollout_logprobs is not None:
            check_column_offsets(rollout_logprobs, "rollout_logprobs")
        # without rollout log-probs the kernels never read this pointer (ROLLOUT_IS=False)
        rollout = rollout_logprobs if rollout_logprobs is not None else old_logprobs
        block_b, block_t, num_warps = token_tiles(B, T, device)
        n_col_tiles = triton.cdiv(T, block_t)
        n_tiles = triton.cdiv(B, block_b) * n_col_tiles
        n_partials = min(n_tiles, _launch.MAX_TOKEN_PARTIALS)
        ratio = torch.empty((B, T), dtype=torch.float32, device=device)
        partials = torch.empty((max(n_partials, 1), N_PARTIALS_COLS), dtype=torch.float32, device=device)
        loss, pg_loss, vf_loss = (torch.empty((), dtype=torch.float32, device=device) for _ in range(3))
        stats = torch.empty(N_STATS, dtype=torch.float32, device=device)
        count = torch.empty((), dtype=torch.float32, device=device)
        low, high = cliprange  # (a pair: ppo_loss below makes it with clip_bounds)
        clip = (1.0 - low, 1.0 + high, cliprange_value)
        dual_c = float(dual_clip) if dual_clip is not None else 0.0
        modes = dict(DUAL_CLIP=dual_clip is not None, ROLLOUT_IS=rollout_logprobs is not None)
        with device_guard(logprobs):
            if n_partials:
                _ppo_loss_fwd_kernel[(n_partials,)](
                    *inputs, rollout, ratio, partials, B, T, n_col_tiles, n_tiles, *_strides(*inputs, rollout),
                    *clip, dual_c, rollout_is_cap,
                    **modes, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=num_warps,
                )
            _ppo_loss_reduce_kernel[(1,)](
                partials, loss, pg_loss, vf_loss, stats, count, n_partials, vf_coef,
                BLOCK_P=triton.next_power_of_2(max(n_partials, 1)), num_warps=4,
            )
        ctx.save_for_backward(*inputs, rollout, count)
        ctx.clip = clip + (vf_coef, dual_c, rollout_is_cap)
        ctx.modes = modes
        ctx.mark_non_differentiable(stats, ratio)
        ctx.set_materialize_grads(False)
        return loss, pg_loss, vf_loss, stats, ratio

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_pg_loss, g_vf_loss, _g_stats, _g_ratio):
        logprobs, old_logprobs, values, old_values, advantages, returns, mask, rollout, count = ctx.saved_tensors
        have = [g is not None for g in (g_loss, g_pg_loss, g_vf_loss)]
        # as autograd of the reference: no gradient (None, not zeros) to a leaf the used outputs ignore
        need_dlogp = ctx.needs_input_grad[0] and (have[0] or have[1])
        need_dv = ctx.needs_input_grad[1] and (have[0] or have[2])
        if not (need_dlogp or need_dv):
            return (None,) * 13
        B, T = logprobs.shape
        dlogp = torch.empty((B, T), dtype=logprobs.dtype, device=logprobs.device) if need_dlogp else None
        dv = torch.empty((B, T), dtype=values.dtype, device=values.device) if need_dv else None
        if B * T:
            block_b, block_t, num_warps = token_tiles(B, T, logprobs.device)
            n_col_tiles = triton.cdiv(T, block_t)
            inputs = (logprobs, old_logprobs, values, old_values, advantages, returns, mask)
            grads = [g if g is not None else count for g in (g_loss, g_pg_loss, g_vf_loss)]  # unread if None
            with device_guard(logprobs):
                _ppo_loss_bwd_kernel[(triton.cdiv(B, block_b) * n_col_tiles,)](
                    *inputs, rollout, *grads, count,
                    dlogp if need_dlogp else count, dv if need_dv else count,
                    B, T, n_col_tiles, *_strides(*inputs, rollout), *ctx.clip, **ctx.modes,
                    HAS_G_LOSS=have[0], HAS_G_PG=have[1], HAS_G_VF=have[2],
                    NEED_DLOGP=need_dlogp, NEED_DV=need_dv,
                    BLOCK_B=block_b, BLOCK_T=block_t, num_warps=num_warps,
                )
        return (dlogp, dv) + (None,) * 11


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
    """Clipped PPO policy loss + vf_coef × clipped value loss over masked `[B, T]` tokens.

    Two launches forward (partial sums, then a one-program reduction) and one backward. `cliprange`: ε, or
    `(low, high)` for the ratio's bounds [1 − low, 1 + high].
    Returns a `PPOLossOutput`: loss, pg_loss, vf_loss differentiable w.r.t. logprobs and
    values (the other inputs are treated as constants), the stats as 0-d float32 views of
    one buffer, and ratio `[B, T]` float32 (detached). With `rollout_logprobs` `[B, T]` each
    token's policy loss is weighted by min(exp(old − rollout), rollout_is_cap) and
    tis_weight_mean / tis_clipfrac are set; without, they are None and the kernels run with
    ROLLOUT_IS=False (no extra load, the same results as before the option).
    """
    loss, pg_loss, vf_loss, stats, ratio = _PPOLossFunction.apply(
        logprobs, values, old_logprobs, old_values, advantages, returns, mask,
        clip_bounds(cliprange), float(cliprange_value), float(vf_coef), dual_clip, rollout_logprobs,
        float(rollout_is_cap),
    )
    (pg_clipfrac, vf_clipfrac, approxkl, policykl, ratio_mean, vpred_mean, value_error, pg_clipfrac_lower,
     tis_weight_mean, tis_clipfrac) = stats.unbind()
    if rollout_logprobs is None:
        tis_weight_mean = tis_clipfrac = None
    return PPOLossOutput(
        loss=loss, pg_loss=pg_loss, vf_loss=vf_loss, pg_clipfrac=pg_clipfrac, vf_clipfrac=vf_clipfrac,
        approxkl=approxkl, policykl=policykl, ratio_mean=ratio_mean, vpred_mean=vpred_mean,
        value_error=value_error, ratio=ratio, pg_clipfrac_lower=pg_clipfrac_lower,
        tis_weight_mean=tis_weight_mean, tis_clipfrac=tis_clipfrac,
    )
