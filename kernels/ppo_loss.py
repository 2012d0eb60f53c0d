"""Clipped PPO policy + value loss, forward and backward: `fastppo.kernels.ppo_loss`.

Math (see `fastppo.reference.ppo_loss`), per token with mask m (as float) and N = Σm:

    r   = exp(logp − old_logp)                  (GSPO, SEQ_RATIO: r = exp(s_i) on every token of row i,
                                                 s_i = Σ_t m·(logp − old) / max(Σ_t m, 1), a constant)
    pg  = max(−A·r, −A·clamp(r, 1 − ε_lo, 1 + ε_hi))                 pg_loss = Σm·pg / N
    (dual clip c > 1: pg = min(pg, −A·c) where A < 0; its clip fraction counts those held)
    (rollout log-probs: pg = w·pg, w = min(exp(old_logp − rollout_logp), cap), a constant)
    v_c = clamp(v, v_old − ε_v, v_old + ε_v)
    vf  = max((v − R)², (v_c − R)²)                                  vf_loss = ½·Σm·vf / N
    (loss weights ω, WEIGHTED: pg_loss = Σm·ω·pg and vf_loss = ½·Σm·ω·vf — the loss aggregations)
    loss = pg_loss + vf_coef·vf_loss
    stats (token means whatever the weights): clip fractions Σm·[clipped > unclipped]/N, approxkl
    ½Σm·(logp − old)²/N, policykl Σm·(old − logp)/N, ratio_mean, vpred_mean, value_error Σm·(v − R)²/N;
    with rollout log-probs tis_weight_mean Σm·w/N, tis_clipfrac Σm·[exp(old − rollout) > cap]/N.

Backward, with ḡ_pg = (g_pg + g_loss)/N and ḡ_vf = ½(g_vf + vf_coef·g_loss)/N (weighted: ·ω instead of /N),
matching torch autograd of the reference term by term: torch.maximum sends the gradient to the larger
argument and half to each on an exact tie (w_u, w_c below: those shares, not the importance
weight w); clamp passes it where lo ≤ x ≤ hi (inclusive):

    d/dlogp = ḡ_pg·m·(w_u·(−A) + w_c·(−A)·[1−ε_lo ≤ r ≤ 1+ε_hi])·r   (× the min's share, dual clip; × w)
    d/dv    = ḡ_vf·m·(w_u·2(v − R) + w_c·2(v_c − R)·[v_old − ε_v ≤ v ≤ v_old + ε_v])
(GSPO's r = s_i·π_t/sg(π_t) has dr/dlogp_t = r as well, so one backward serves both levels.)

Launches: forward = 1 kernel writing ratio `[B, T]` and per-program partial sums `[P, 13]`
(P ≤ MAX_TOKEN_PARTIALS, grid-stride over tiles) + 1 single-program kernel that reduces them and
writes loss, pg_loss, vf_loss and the stats (deterministic, no atomics, no host sync); GSPO adds one
per-row reduction first. Backward = 1 kernel recomputing r (and w) from the inputs and writing both
gradients. Bytes per token (fp32 inputs, bool mask): forward reads 6·4 + 1 and writes 4 (29 bytes);
backward reads 29 and writes 8; rollout log-probs and loss weights add a read of 4 each to each pass.

Shapes: all inputs `[B, T]` (rollout log-probs, loss weights too), any float dtype (upcast to float32 on load),
any strides; mask bool / int / float. ratio is float32 contiguous; gradients have the dtype of their input.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastppo.op_outputs import PPOLossOutput, PPOLossSettings, clip_bounds, resolve_settings

from . import _launch
from ._launch import check_column_offsets, device_guard, token_tiles

# Partial-sum columns, each a masked sum Σm·(...) (0, 1: Σm·ω·(...) when weighted): 0 pg, 1 vf, 2 [pg clipped],
# 3 [vf clipped], 4 log_ratio², 5 −log_ratio, 6 ratio, 7 v, 8 (v − R)², 9 m, 10 [held at −A·c by the dual clip],
# 11 w, 12 [exp(old − rollout) > cap] (11, 12 stay 0 without rollout log-probs). Columns 2..8 and 10..12 become
# the N_STATS stats: pg_clipfrac, vf_clipfrac, approxkl, policykl, ratio_mean, vpred_mean, value_error,
# pg_clipfrac_lower, tis_weight_mean, tis_clipfrac.
N_PARTIALS_COLS = 13
N_STATS = 10
_INPUT_NAMES = ("logprobs", "old_logprobs", "values", "old_values", "advantages", "returns", "mask")


@triton.jit
def _load_tile(ptr, rows, cols, s_b, s_t, ok):
    return tl.load(ptr + rows[:, None] * s_b + cols[None, :] * s_t, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _ratio(log_ratio, seq_lr_ptr, rows, B, SEQ_RATIO: tl.constexpr):
    """Each token's ratio: exp(its log-ratio), or (GSPO) exp(its response's mean log-ratio) on every token."""
    if SEQ_RATIO:
        seq_lr = tl.load(seq_lr_ptr + rows, mask=rows < B, other=0.0)
        return tl.exp(seq_lr)[:, None] + tl.zeros_like(log_ratio)
    return tl.exp(log_ratio)


@triton.jit
def _seq_log_ratio_kernel(
    logp_ptr, old_logp_ptr, mask_ptr,  # [B, T]
    out_ptr,  # [B] float32: Σ m·(logp − old) / max(Σ m, 1)
    T, s_lp_b, s_lp_t, s_olp_b, s_olp_t, s_m_b, s_m_t,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    count = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        ok = cols < T
        logp = tl.load(logp_ptr + row * s_lp_b + cols * s_lp_t, mask=ok, other=0.0).to(tl.float32)
        old_logp = tl.load(old_logp_ptr + row * s_olp_b + cols * s_olp_t, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + row * s_m_b + cols * s_m_t, mask=ok, other=0.0).to(tl.float32)
        acc += (logp - old_logp) * m
        count += m
    tl.store(out_ptr + row, tl.sum(acc) / tl.maximum(tl.sum(count), 1.0))


@triton.jit
def _ppo_loss_fwd_kernel(
    logp_ptr, old_logp_ptr, v_ptr, old_v_ptr, adv_ptr, ret_ptr,  # [B, T] any float
    mask_ptr,  # [B, T] bool / int / float
    roll_logp_ptr,  # [B, T] any float: the sampling engine's log-probs (read when ROLLOUT_IS)
    weight_ptr,  # [B, T] any float: the loss aggregation's per-token weights (read when WEIGHTED)
    seq_lr_ptr,  # [B] float32: each response's mean log-ratio (read when SEQ_RATIO)
    ratio_ptr,  # [B, T] float32, contiguous
    partials_ptr,  # [P, 13] float32
    B, T, n_col_tiles, n_tiles,
    s_lp_b, s_lp_t, s_olp_b, s_olp_t, s_v_b, s_v_t, s_ov_b, s_ov_t, s_a_b, s_a_t, s_r_b, s_r_t, s_m_b, s_m_t,
    s_rl_b, s_rl_t, s_w_b, s_w_t,
    clip_lo, clip_hi, cliprange_value, dual_clip, rollout_is_cap,
    DUAL_CLIP: tl.constexpr,
    ROLLOUT_IS: tl.constexpr,
    WEIGHTED: tl.constexpr,
    SEQ_RATIO: tl.constexpr,
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
        ratio = _ratio(log_ratio, seq_lr_ptr, rows, B, SEQ_RATIO)
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
        lw = m  # each token's share of the losses' sums: the mask, or mask × aggregation weight
        if WEIGHTED:
            lw = m * _load_tile(weight_ptr, rows, cols, s_w_b, s_w_t, ok)
        acc_pg += tl.sum(pg * lw)
        acc_vf += tl.sum(tl.maximum(vf_unclipped, vf_clipped) * lw)
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
    WEIGHTED: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    p = tl.arange(0, BLOCK_P)
    k = tl.arange(0, 16)
    parts = tl.load(partials_ptr + p[:, None] * 13 + k[None, :], mask=(p < n_partials)[:, None] & (k < 13)[None, :],
                    other=0.0)
    sums = tl.sum(parts, axis=0)  # [16]
    n = tl.sum(tl.where(k == 9, sums, 0.0))
    means = sums / n  # NaN everywhere for an empty mask, like the reference
    losses = sums if WEIGHTED else means  # weighted: the weights already hold the aggregation's divisors
    pg_loss = tl.sum(tl.where(k == 0, losses, 0.0))
    vf_loss = 0.5 * tl.sum(tl.where(k == 1, losses, 0.0))
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
    weight_ptr,  # [B, T] any float: the loss aggregation's per-token weights (read when WEIGHTED)
    seq_lr_ptr,  # [B] float32: each response's mean log-ratio (read when SEQ_RATIO)
    g_loss_ptr, g_pg_ptr, g_vf_ptr,  # [] upstream gradients (read when HAS_G_*)
    count_ptr,  # [] float32: N from the forward
    dlogp_ptr,  # [B, T] dtype of logprobs, contiguous
    dv_ptr,  # [B, T] dtype of values, contiguous
    B, T, n_col_tiles,
    s_lp_b, s_lp_t, s_olp_b, s_olp_t, s_v_b, s_v_t, s_ov_b, s_ov_t, s_a_b, s_a_t, s_r_b, s_r_t, s_m_b, s_m_t,
    s_rl_b, s_rl_t, s_w_b, s_w_t,
    clip_lo, clip_hi, cliprange_value, vf_coef, dual_clip, rollout_is_cap,
    DUAL_CLIP: tl.constexpr,
    ROLLOUT_IS: tl.constexpr,
    WEIGHTED: tl.constexpr,
    SEQ_RATIO: tl.constexpr,
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
    m = _load_tile(mask_ptr, rows, cols, s_m_b, s_m_t, ok)
    # d loss / d (token term) = m·w weighted, else m / N (the masked mean: divided first, as autograd does)
    n = 1.0
    if WEIGHTED:
        m = m * _load_tile(weight_ptr, rows, cols, s_w_b, s_w_t, ok)
    else:
        n = tl.load(count_ptr)

    if NEED_DLOGP:
        logp = _load_tile(logp_ptr, rows, cols, s_lp_b, s_lp_t, ok)
        old_logp = _load_tile(old_logp_ptr, rows, cols, s_olp_b, s_olp_t, ok)
        adv = _load_tile(adv_ptr, rows, cols, s_a_b, s_a_t, ok)
        ratio = _ratio(logp - old_logp, seq_lr_ptr, rows, B, SEQ_RATIO)  # dr/dlogp = r at either level
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
    def forward(ctx, logprobs, values, old_logprobs, old_values, advantages, returns, mask, settings,
                rollout_logprobs, loss_weights):
        B, T = logprobs.shape
        device = logprobs.device
        inputs = (logprobs, old_logprobs, values, old_values, advantages, returns, mask)
        for name, tensor in zip(_INPUT_NAMES, inputs):
            check_column_offsets(tensor, name)
        for name, tensor in (("rollout_logprobs", rollout_logprobs), ("loss_weights", loss_weights)):
            if tensor is not None:
                check_column_offsets(tensor, name)
        # an option left out is never read by the kernels (its constexpr is False): any pointer will do
        rollout = rollout_logprobs if rollout_logprobs is not None else old_logprobs
        weights = loss_weights if loss_weights is not None else old_logprobs
        sequence = settings.importance_sampling_level == "sequence"
        block_b, block_t, num_warps = token_tiles(B, T, device)
        n_col_tiles = triton.cdiv(T, block_t)
        n_tiles = triton.cdiv(B, block_b) * n_col_tiles
        n_partials = min(n_tiles, _launch.MAX_TOKEN_PARTIALS)
        ratio = torch.empty((B, T), dtype=torch.float32, device=device)
        partials = torch.empty((max(n_partials, 1), N_PARTIALS_COLS), dtype=torch.float32, device=device)
        loss, pg_loss, vf_loss = (torch.empty((), dtype=torch.float32, device=device) for _ in range(3))
        stats = torch.empty(N_STATS, dtype=torch.float32, device=device)
        count = torch.empty((), dtype=torch.float32, device=device)
        seq_lr = torch.empty((B,) if sequence else (1,), dtype=torch.float32, device=device)
        low, high = clip_bounds(settings.cliprange)
        dual_clip = settings.dual_clip
        dual_c = float(dual_clip) if dual_clip is not None else 0.0
        clip = (1.0 - low, 1.0 + high, float(settings.cliprange_value))
        modes = dict(DUAL_CLIP=dual_clip is not None, ROLLOUT_IS=rollout_logprobs is not None,
                     WEIGHTED=loss_weights is not None, SEQ_RATIO=sequence)
        cap = float(settings.rollout_is_cap)
        with device_guard(logprobs):
            if sequence and B:
                _seq_log_ratio_kernel[(B,)](
                    logprobs, old_logprobs, mask, seq_lr, T, *_strides(logprobs, old_logprobs, mask),
                    BLOCK_T=min(max(triton.next_power_of_2(T), 16), 1024), num_warps=4,
                )
            if n_partials:
                _ppo_loss_fwd_kernel[(n_partials,)](
                    *inputs, rollout, weights, seq_lr, ratio, partials, B, T, n_col_tiles, n_tiles,
                    *_strides(*inputs, rollout, weights), *clip, dual_c, cap,
                    **modes, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=num_warps,
                )
            _ppo_loss_reduce_kernel[(1,)](
                partials, loss, pg_loss, vf_loss, stats, count, n_partials, float(settings.vf_coef),
                WEIGHTED=modes["WEIGHTED"], BLOCK_P=triton.next_power_of_2(max(n_partials, 1)), num_warps=4,
            )
        ctx.save_for_backward(*inputs, rollout, weights, seq_lr, count)
        ctx.clip = clip + (float(settings.vf_coef), dual_c, cap)
        ctx.modes = modes
        ctx.mark_non_differentiable(stats, ratio)
        ctx.set_materialize_grads(False)
        return loss, pg_loss, vf_loss, stats, ratio

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_pg_loss, g_vf_loss, _g_stats, _g_ratio):
        (logprobs, old_logprobs, values, old_values, advantages, returns, mask, rollout, weights, seq_lr,
         count) = ctx.saved_tensors
        have = [g is not None for g in (g_loss, g_pg_loss, g_vf_loss)]
        # as autograd of the reference: no gradient (None, not zeros) to a leaf the used outputs ignore
        need_dlogp = ctx.needs_input_grad[0] and (have[0] or have[1])
        need_dv = ctx.needs_input_grad[1] and (have[0] or have[2])
        if not (need_dlogp or need_dv):
            return (None,) * 10
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
                    *inputs, rollout, weights, seq_lr, *grads, count,
                    dlogp if need_dlogp else count, dv if need_dv else count,
                    B, T, n_col_tiles, *_strides(*inputs, rollout, weights), *ctx.clip, **ctx.modes,
                    HAS_G_LOSS=have[0], HAS_G_PG=have[1], HAS_G_VF=have[2],
                    NEED_DLOGP=need_dlogp, NEED_DV=need_dv,
                    BLOCK_B=block_b, BLOCK_T=block_t, num_warps=num_warps,
                )
        return (dlogp, dv) + (None,) * 8


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
    """`fastppo.reference.ppo_loss`'s math, options and record (the scalars separately or as `settings`), in the
    launches the module docstring lists. loss, pg_loss, vf_loss are differentiable w.r.t. logprobs and values;
    the stats are 0-d float32 views of one buffer, ratio `[B, T]` float32 (detached); tis_weight_mean and
    tis_clipfrac are None without `rollout_logprobs` (the kernels then never read them: ROLLOUT_IS=False).
    """
    settings = resolve_settings(settings, cliprange, cliprange_value, vf_coef, dual_clip, rollout_is_cap)
    loss, pg_loss, vf_loss, stats, ratio = _PPOLossFunction.apply(
        logprobs, values, old_logprobs, old_values, advantages, returns, mask, settings, rollout_logprobs,
        loss_weights,
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
