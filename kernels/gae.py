"""GAE as a blocked reverse scan, and masked whitening: `fastppo.kernels.gae`, `.masked_whiten`.

GAE (TRL classic, see `fastppo.reference.gae`), per row, with values and rewards zeroed off
the mask (V_T = 0) and c = γλ:

    δ_t = r_t + γ·V_{t+1} − V_t,     A_t = δ_t + c·A_{t+1},     returns_t = A_t + V_t.

A_t is the affine map f_t(x) = c·x + δ_t applied to A_{t+1}, so a block of positions
[t0, t1) reduces to A_t = a_t·A_{t1} + b_t where (a_t, b_t) is the composition
f_t ∘ f_{t+1} ∘ … ∘ f_{t1−1}. Composition is associative but not commutative; the kernel
loads each block with REVERSED indices (scan position i ↔ t = t1 − 1 − i) and runs a
FORWARD `tl.associative_scan` (reverse=True with a non-commutative combine is reported wrong
on GPUs, triton #4362/#8412), then carries A at the block's first position into the next
block to the left. One program per BLOCK_B rows; T/BLOCK_T scan steps instead of T
dependent steps. Bytes per token: read r, V, mask (+ V, mask at t+1, cache hits), write
advantages + returns: ~17 bytes for fp32 and a bool mask. One launch.

masked_whiten (see `fastppo.reference.masked_whiten`), with weights m = mask.float():

    n = Σm,  mean = Σm·x / n,  var = Σm·(x − mean)² / (n − 1)  (/ n when n ≤ 1),
    out = (x − mean)·rsqrt(var + 1e-8)  (+ mean when not shift_mean).

Two launches, no host sync: (1) P ≤ MAX_TOKEN_PARTIALS programs each reduce their tiles to
(n, Σm·x, M2 about their own mean), tiles combined with Chan's parallel formula, so a large
common offset (values ~1e3) does not cancel; (2) every program of the elementwise pass
first combines the P partials the same way (P·24 bytes of float64, from L2), then writes its tiles.
Bytes per element: 2 reads of x and mask + 1 write (~13 bytes fp32/bool).

Shapes: gae: rewards, values, mask `[B, T]` (any float dtype / mask dtype, any strides) →
advantages, returns `[B, T]` float32 contiguous. masked_whiten: values and mask of one
shape (any number of dims; viewed as 2-D, copied only if no 2-D view exists) → float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import check_column_offsets, device_guard, token_tiles


@triton.jit
def _compose_affine(a_later, b_later, a_earlier, b_earlier):
    # (scan order = decreasing t) apply x ↦ a_later·x + b_later first, then the earlier position's map
    return a_later * a_earlier, a_earlier * b_later + b_earlier


@triton.jit
def _gae_kernel(
    rewards_ptr,  # [B, T] any float
    values_ptr,  # [B, T] any float
    mask_ptr,  # [B, T] bool / int / float
    adv_ptr,  # [B, T] float32, contiguous
    ret_ptr,  # [B, T] float32, contiguous
    B, T,
    s_r_b, s_r_t, s_v_b, s_v_t, s_m_b, s_m_t,
    gamma, gamma_lam,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    i = tl.arange(0, BLOCK_T)
    carry = tl.zeros([BLOCK_B], dtype=tl.float32)  # A at the first position of the block to the right
    for k in range(tl.cdiv(T, BLOCK_T)):
        t = T - 1 - k * BLOCK_T - i  # reversed: scan position i ↔ time t
        ok = row_ok[:, None] & (t >= 0)[None, :]
        ok_next = row_ok[:, None] & ((t >= 0) & (t + 1 < T))[None, :]
        m = tl.load(mask_ptr + rows64[:, None] * s_m_b + t[None, :] * s_m_t, mask=ok, other=0).to(tl.float32)
        r = tl.load(rewards_ptr + rows64[:, None] * s_r_b + t[None, :] * s_r_t, mask=ok, other=0.0)
        v = tl.load(values_ptr + rows64[:, None] * s_v_b + t[None, :] * s_v_t, mask=ok, other=0.0)
        m_next = tl.load(mask_ptr + rows64[:, None] * s_m_b + (t + 1)[None, :] * s_m_t, mask=ok_next, other=0)
        v_next = tl.load(values_ptr + rows64[:, None] * s_v_b + (t + 1)[None, :] * s_v_t, mask=ok_next, other=0.0)
        # multiply (not where) by the mask, as the reference does
        r = r.to(tl.float32) * m
        v = v.to(tl.float32) * m
        v_next = v_next.to(tl.float32) * m_next.to(tl.float32)
        delta = r + gamma * v_next - v
        # positions before t = 0 (last block only) are the identity map
        a = tl.where(ok, gamma_lam, 1.0)
        b = tl.where(ok, delta, 0.0)
        a, b = tl.associative_scan((a, b), 1, _compose_affine)
        adv = a * carry[:, None] + b
        out = rows64[:, None] * T + t[None, :]
        tl.store(adv_ptr + out, adv, mask=ok)
        tl.store(ret_ptr + out, adv + v, mask=ok)
        carry = tl.sum(tl.where((i == BLOCK_T - 1)[None, :], adv, 0.0), axis=1)


@triton.jit
def _tile_offsets(tile, n_col_tiles, B, T, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = (tile // n_col_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = (tile % n_col_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = (rows < B)[:, None] & (cols < T)[None, :]
    return rows.to(tl.int64), cols, ok


@triton.jit
def _whiten_partials_kernel(
    x_ptr,  # [B, T] any float
    mask_ptr,  # [B, T] bool / int / float
    partials_ptr,  # [P, 3] float64: (n, Σm·x, M2 about Σm·x / n)
    B, T, n_col_tiles, n_tiles,
    s_x_b, s_x_t, s_m_b, s_m_t,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.cast(0.0, tl.float64)
    mean = tl.cast(0.0, tl.float64)
    m2 = tl.cast(0.0, tl.float64)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        rows, cols, ok = _tile_offsets(tile, n_col_tiles, B, T, BLOCK_B, BLOCK_T)
        # float64 sums: the mean must round once, to the float32 nearest the exact one, or an offset
        # of ~1e3 shifts every output by an ulp of it (GPU float32 division is not correctly rounded)
        x = tl.load(x_ptr + rows[:, None] * s_x_b + cols[None, :] * s_x_t, mask=ok, other=0.0).to(tl.float64)
        m = tl.load(mask_ptr + rows[:, None] * s_m_b + cols[None, :] * s_m_t, mask=ok, other=0).to(tl.float64)
        n_tile = tl.sum(m)
        mean_tile = tl.sum(x * m) / tl.maximum(n_tile, 1e-30)
        centered = x - mean_tile
        m2_tile = tl.sum(centered * centered * m)
        # Chan et al.: merge (n, mean, M2) with the tile's
        n_new = n + n_tile
        delta = mean_tile - mean
        share = n_tile / tl.maximum(n_new, 1e-30)
        mean = mean + delta * share
        m2 = m2 + m2_tile + delta * delta * n * share
        n = n_new
    tl.store(partials_ptr + pid * 3, n)
    tl.store(partials_ptr + pid * 3 + 1, mean * n)
    tl.store(partials_ptr + pid * 3 + 2, m2)


@triton.jit
def _whiten_apply_kernel(
    x_ptr,  # [B, T] any float
    partials_ptr,  # [P, 3] float64
    out_ptr,  # [B, T] float32, contiguous
    B, T, n_col_tiles, n_tiles, n_partials,
    s_x_b, s_x_t,
    SHIFT_MEAN: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    p = tl.arange(0, BLOCK_P)
    p_ok = p < n_partials
    n_p = tl.load(partials_ptr + p * 3, mask=p_ok, other=0.0)
    sum_p = tl.load(partials_ptr + p * 3 + 1, mask=p_ok, other=0.0)
    m2_p = tl.load(partials_ptr + p * 3 + 2, mask=p_ok, other=0.0)
    n = tl.sum(n_p)
    mean = tl.sum(sum_p) / n  # NaN for an empty mask, like the reference
    dev = tl.where(n_p > 0, sum_p / tl.maximum(n_p, 1e-30) - mean, 0.0)
    m2 = tl.sum(m2_p) + tl.sum(n_p * dev * dev)
    var = m2 / tl.where(n > 1.0, n - 1.0, n)  # Bessel-corrected unless a single position
    inv_std = (1.0 / tl.sqrt(var + 1e-8)).to(tl.float32)
    mean = mean.to(tl.float32)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows, cols, ok = _tile_offsets(tile, n_col_tiles, B, T, BLOCK_B, BLOCK_T)
        x = tl.load(x_ptr + rows[:, None] * s_x_b + cols[None, :] * s_x_t, mask=ok, other=0.0).to(tl.float32)
        out = (x - mean) * inv_std
        if not SHIFT_MEAN:
            out = out + mean
        tl.store(out_ptr + rows[:, None] * T + cols[None, :], out, mask=ok)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation per row (TRL-classic masking), one launch.

    rewards, values, mask `[B, T]` → (advantages, returns) `[B, T]` float32; values and
    rewards are zeroed off the mask first, returns = advantages + masked values.
    """
    B, T = rewards.shape
    advantages = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    if B * T == 0:
        return advantages, returns
    for name, tensor in (("rewards", rewards), ("values", values), ("mask", mask)):
        check_column_offsets(tensor, name)
    block_b, block_t, num_warps = token_tiles(B, T, rewards.device, scan=True)
    with device_guard(rewards):
        _gae_kernel[(triton.cdiv(B, block_b),)](
            rewards, values, mask, advantages, returns,
            B, T,
            rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1), mask.stride(0), mask.stride(1),
            float(gamma), float(gamma) * float(lam),
            BLOCK_B=block_b, BLOCK_T=block_t, num_warps=num_warps,
        )
    return advantages, returns


def _as_2d(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() < 2:
        return tensor.reshape(1, -1)
    return tensor.reshape(-1, tensor.shape[-1])  # a view when the strides allow, else a copy


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values − mean)·rsqrt(var + 1e-8) with the masked mean and (Bessel) variance; + mean unless shift_mean.

    values, mask of one shape → float32 of that shape. Two launches, no host sync. An empty
    mask gives NaN everywhere, as the reference does.
    """
    shape = values.shape
    x, m = _as_2d(values), _as_2d(mask)
    B, T = x.shape
    out = torch.empty((B, T), dtype=torch.float32, device=values.device)
    if B * T == 0:
        return out.reshape(shape)
    check_column_offsets(x, "values")
    check_column_offsets(m, "mask")
    block_b, block_t, num_warps = token_tiles(B, T, values.device)
    n_col_tiles = triton.cdiv(T, block_t)
    n_tiles = triton.cdiv(B, block_b) * n_col_tiles
    n_partials = min(n_tiles, _launch.MAX_TOKEN_PARTIALS)
    partials = torch.empty((n_partials, 3), dtype=torch.float64, device=values.device)
    with device_guard(values):
        _whiten_partials_kernel[(n_partials,)](
            x, m, partials, B, T, n_col_tiles, n_tiles,
            x.stride(0), x.stride(1), m.stride(0), m.stride(1),
            BLOCK_B=block_b, BLOCK_T=block_t, num_warps=num_warps,
        )
        _whiten_apply_kernel[(n_partials,)](
            x, partials, out, B, T, n_col_tiles, n_tiles, n_partials,
            x.stride(0), x.stride(1),
            SHIFT_MEAN=bool(shift_mean), BLOCK_P=triton.next_power_of_2(n_partials),
            BLOCK_B=block_b, BLOCK_T=block_t, num_warps=num_warps,
        )
    return out.reshape(shape)
