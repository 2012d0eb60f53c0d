"""Exact per-row KL(p ‖ q), p = softmax(logits), q = softmax(ref_logits): one pass over both rows.

Math, per row (x = logits, r = ref_logits, both ∈ R^V):

    KL = Σ_v p_v (log p_v − log q_v) = Σ_v p_v (x_v − r_v) − (lse(x) − lse(r))
       = a / s_x − (m_x − m_r) − (ln s_x − ln s_r)

with m_x = max x, s_x = Σ e^{x_v − m_x}, a = Σ e^{x_v − m_x} (x_v − r_v) (and m_r, s_r for r).
One program per row streams both rows in blocks, with a running max for each (scalars: one
exp2 per element) and per-lane sums s_x, s_r, a, rescaled by e^{m_old − m_new} when a max
grows (a is weighted by p's terms, so it shares s_x's rescale). Differences x − r and
m_x − m_r are taken on the raw logits, so nearly equal distributions lose no precision to
a large common offset. float32 throughout. Identical rows give exactly 0; KL ≥ 0 is exact
math, so a rounding-level negative result is clamped to 0 (NaN stays NaN).

Shapes: logits, ref_logits [..., V] (any float dtype, any strides, read in place) →
[...] float32. No gradient (ops wraps it in no_grad).
Bytes moved, N rows: 2·N·V·sizeof(dtype) read once + 4·N written.

Rows stream as 128-bit loads whatever V is, as in kernels/logprobs.py (for a RAGGED V: blocks
aligned to 16 bytes, masked only at a row's ends).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import aligned_block, check_column_offsets, device_guard, row_pieces, vocab_block

LOG2E = 1.4426950408889634  # log2(e)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _kl_block(x, r, m_x, m_r, s_x, s_r, a):
    """Fold one block of both rows into the running maxima and per-lane sums."""
    m_x_new = tl.maximum(m_x, tl.max(x, 0))
    m_r_new = tl.maximum(m_r, tl.max(r, 0))
    # finite shift references: while a row is all -inf so far its sums stay 0
    ref_x = tl.where(m_x_new == -float("inf"), 0.0, m_x_new)
    ref_r = tl.where(m_r_new == -float("inf"), 0.0, m_r_new)
    rescale_x = tl.exp2((m_x - ref_x) * _LOG2E)
    rescale_r = tl.exp2((m_r - ref_r) * _LOG2E)
    e_x = tl.exp2((x - ref_x) * _LOG2E)
    e_r = tl.exp2((r - ref_r) * _LOG2E)
    # p_v = 0 (padding, or a -inf logit) contributes 0, not 0·(x − r) = NaN
    a = a * rescale_x + tl.where(e_x > 0.0, e_x * (x - r), 0.0)
    s_x = s_x * rescale_x + e_x
    s_r = s_r * rescale_r + e_r
    return m_x_new, m_r_new, s_x, s_r, a


@triton.jit
def _full_kl_kernel(
    x_ptr,  # [N, V] logits, through x strides
    r_ptr,  # [N, V] ref_logits, through r strides
    kl_ptr,  # [N] float32 out
    n_cols,  # V
    x_n_inner,  # row r of x sits at (r // x_n_inner)·x_stride_outer + (r % x_n_inner)·x_stride_inner
    x_stride_outer,
    x_stride_inner,
    x_stride_col,
    r_n_inner,
    r_stride_outer,
    r_stride_inner,
    r_stride_col,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,  # elements per 16 bytes when the logits' columns are contiguous, else 1
    R_ALIGNED: tl.constexpr,  # ref_logits has the logits' row layout and dtype: the same 16-byte phase
    RAGGED: tl.constexpr,  # rows off 16-byte boundaries or V not a multiple of 16
):
    row = tl.program_id(0)
    x_outer, x_inner = (row // x_n_inner).to(tl.int64), (row % x_n_inner).to(tl.int64)
    r_outer, r_inner = (row // r_n_inner).to(tl.int64), (row % r_n_inner).to(tl.int64)
    x_offset = x_outer * x_stride_outer + x_inner * x_stride_inner  # int64: N·V may pass 2**31
    r_offset = r_outer * r_stride_outer + r_inner * r_stride_inner
    # Blocks start on 16-byte boundaries whatever V is: lanes [head, head + V) hold the rows. Only
    # the first and the last block need a mask; the blocks between load 128 bits per thread.
    head = x_offset % ALIGN if RAGGED else 0
    x_base = x_ptr + tl.multiple_of(x_offset - head, ALIGN)
    if R_ALIGNED:
        r_base = r_ptr + tl.multiple_of(r_offset - head, ALIGN)
    else:  # lane l is column l − head
        r_base = r_ptr + r_offset - head * r_stride_col
    lanes = tl.arange(0, BLOCK)

    m_x = -float("inf")
    m_r = -float("inf")
    s_x = tl.zeros([BLOCK], dtype=tl.float32)  # per lane Σ e^{x − m_x}
    s_r = tl.zeros([BLOCK], dtype=tl.float32)  # per lane Σ e^{r − m_r}
    a = tl.zeros([BLOCK], dtype=tl.float32)  # per lane Σ e^{x − m_x}·(x − r)
    if RAGGED:  # masked first and last blocks, unmasked 128-bit loads between
        total = head + n_cols
        mask = (lanes >= head) & (lanes < total)
        x = tl.load(x_base + lanes * x_stride_col, mask=mask, other=-float("inf")).to(tl.float32)
        r = tl.load(r_base + lanes * r_stride_col, mask=mask, other=-float("inf")).to(tl.float32)
        m_x, m_r, s_x, s_r, a = _kl_block(x, r, m_x, m_r, s_x, s_r, a)
        end = (total // BLOCK) * BLOCK
        for start in range(BLOCK, end, BLOCK):
            x = tl.load(x_base + (start + lanes) * x_stride_col).to(tl.float32)
            r = tl.load(r_base + (start + lanes) * r_stride_col).to(tl.float32)
            m_x, m_r, s_x, s_r, a = _kl_block(x, r, m_x, m_r, s_x, s_r, a)
        if (end >= BLOCK) & (end < total):
            mask = end + lanes < total
            x = tl.load(x_base + (end + lanes) * x_stride_col, mask=mask, other=-float("inf")).to(tl.float32)
            r = tl.load(r_base + (end + lanes) * r_stride_col, mask=mask, other=-float("inf")).to(tl.float32)
            m_x, m_r, s_x, s_r, a = _kl_block(x, r, m_x, m_r, s_x, s_r, a)
    else:  # aligned rows, V a multiple of 16: the mask is uniform over each 16 bytes already
        for start in range(0, n_cols, BLOCK):
            cols = start + lanes
            mask = cols < n_cols
            x = tl.load(x_base + cols * x_stride_col, mask=mask, other=-float("inf")).to(tl.float32)
            r = tl.load(r_base + cols * r_stride_col, mask=mask, other=-float("inf")).to(tl.float32)
            m_x, m_r, s_x, s_r, a = _kl_block(x, r, m_x, m_r, s_x, s_r, a)

    sum_x = tl.sum(s_x, 0)
    kl = tl.sum(a, 0) / sum_x - (m_x - m_r) - (tl.log2(sum_x) - tl.log2(tl.sum(s_r, 0))) * _LN2
    tl.store(kl_ptr + row, tl.where(kl < 0.0, 0.0, kl))


# --------------------------------------------------------------------------- launcher


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) ‖ softmax(ref_logits)) per row, float32; same contract as `fastppo.reference`.

    logits, ref_logits `[..., V]` of one shape and device (CUDA, or CPU under
    TRITON_INTERPRET=1), any float dtypes and strides (read in place, never copied)
    → `[...]` float32, ≥ 0. No autograd: call it under `torch.no_grad()` (ops does).
    Raises ValueError on mismatched shapes or devices, or V = 0.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    if logits.device != ref_logits.device:
        raise ValueError(f"ref_logits is on {ref_logits.device} but logits is on {logits.device}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V ≥ 1, got shape {tuple(logits.shape)}")
    check_column_offsets(logits, "logits")
    check_column_offsets(ref_logits, "ref_logits")
    kl = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    n_cols = logits.shape[-1]
    block, num_warps = vocab_block(n_cols, logits.device)
    with device_guard(logits):
        for index, (x_layout, r_layout) in row_pieces(logits, ref_logits):
            n_rows = kl[index].numel()
            if n_rows == 0:
                continue
            launch = aligned_block(block, n_cols, logits, x_layout, ref_logits, r_layout)
            _full_kl_kernel[(n_rows,)](
                logits[index], ref_logits[index], kl[index],
                n_cols, *x_layout, *r_layout,
                BLOCK=launch["BLOCK"], ALIGN=launch["ALIGN"], RAGGED=launch["RAGGED"],
                R_ALIGNED=launch["OTHER_ALIGNED"], num_warps=num_warps,
            )
    return kl
