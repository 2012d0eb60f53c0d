"""Log-probabilities (and entropy) of labels under softmax(logits / T): one pass over each row.

Math, per row z ∈ R^V with y = z / T, label k:

    logp  = y_k − lse(y),            lse(y) = log Σ_v exp(y_v)
    H     = lse(y) − Σ_v p_v y_v,    p = softmax(y)
    ∂logp/∂z_v = (1[v = k] − p_v) / T
    ∂H/∂z_v    = −p_v (log p_v + H) / T

Forward: one program per row streams the row in blocks of BLOCK columns, keeping a running
max m (a scalar, so each element costs one exp2) and per-lane partial sums rescaled when m
grows: s = Σ 2^{t_v} and, for the entropy, a = Σ 2^{t_v}·t_v, with t_v = (z_v − m)·log2(e)/T.
Then lse = m/T + ln2·log2(s), logp = ln2·((z_k − m)·log2(e)/T − log2 s) (≤ 0 by
construction: both terms are ≤ 0), H = ln2·(log2 s − a/s). Keeping every sum relative to the
running max avoids the cancellation of lse − Σ p·y when logits are large. All arithmetic is
float32 whatever the input dtype.

Rows stream as 128-bit loads whatever V is. When V and the row strides are multiples of 16
elements, one masked loop over the row vectorises as it is. Otherwise (RAGGED: an odd V such as
GPT-2's 50257 puts rows off 16-byte boundaries and ends them mid-way through 16 bytes, and such
a mask makes every load element-wide) the blocks start on 16-byte boundaries, the row's lanes
begin `head` = (row offset mod ALIGN) into the first block, and only the first and the last
block are masked; the blocks between load unmasked (_launch.aligned_block decides).

Backward recomputes p_v = 2^{(z_v − m)·log2(e)/T − log2 s} from the two float32 numbers
per row the forward saved (m, log2 s), and writes the gradient in the logits' dtype —
optionally into the logits' own buffer (`inplace_backward=True`).

Shapes: logits [..., V] (fp32/bf16/fp16, any strides: views like `logits[:, :-1]` are read
in place), labels [...] integer → logp [...] float32 (and entropy [...] float32).
Bytes moved, N rows: forward reads N·V·sizeof(logits) once (+ O(N)); backward reads the
logits once and writes the gradient once: 2·N·V·sizeof(logits). The eager reference moves
≥ 5× that (upcast, log_softmax, gather, and a softmax per backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import aligned_block, check_column_offsets, device_guard, row_pieces, vocab_block

LOG2E = 1.4426950408889634  # log2(e)
LN2 = 0.6931471805599453  # ln(2)
_LN2 = tl.constexpr(LN2)  # for use inside kernels


@triton.jit
def _forward_block(z, m, s, a, scale, RETURN_ENTROPY: tl.constexpr):
    """Fold one block of raw logits `z` into the running max `m` and per-lane sums `s`, `a`."""
    m_new = tl.maximum(m, tl.max(z, 0))
    # Shift by a finite reference: while every logit so far is -inf, shift by 0 (sums stay 0).
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
    shift = (m - m_ref) * scale  # ≤ 0; -inf on the first finite block, where s = a = 0
    rescale = tl.exp2(shift)
    t = (z - m_ref) * scale  # ≤ 0; -inf on padding lanes and -inf logits
    e = tl.exp2(t)
    if RETURN_ENTROPY:
        # Moving the reference by `shift` turns Σ e·t into rescale·(Σ e·t + shift·Σ e).
        shift_finite = tl.where(m == -float("inf"), 0.0, shift)
        a = (a + shift_finite * s) * rescale + tl.where(e > 0.0, e * t, 0.0)
    s = s * rescale + e
    return m_new, s, a


@triton.jit
def _logprobs_forward_kernel(
    logits_ptr,  # [N, V] through (n_inner, stride_outer, stride_inner, stride_col)
    labels_ptr,  # [N] int
    logp_ptr,  # [N] float32 out
    entropy_ptr,  # [N] float32 out (written when RETURN_ENTROPY)
    row_max_ptr,  # [N] float32 out: max_v z_v (raw logits)
    log2_sum_ptr,  # [N] float32 out: log2 Σ_v 2^{(z_v − max)·scale}
    n_cols,  # V
    n_inner,  # row r sits at (r // n_inner)·stride_outer + (r % n_inner)·stride_inner
    stride_outer,
    stride_inner,
    stride_col,
    scale,  # log2(e) / temperature
    RETURN_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,  # elements per 16 bytes when columns are contiguous, else 1
    RAGGED: tl.constexpr,  # rows off 16-byte boundaries or V not a multiple of 16 (see the module doc)
):
    row = tl.program_id(0)
    outer, inner = (row // n_inner).to(tl.int64), (row % n_inner).to(tl.int64)
    offset = outer * stride_outer + inner * stride_inner  # int64: N·V may pass 2**31
    head = offset % ALIGN if RAGGED else 0  # lanes [head, head + V) of the aligned blocks hold the row
    x_base = logits_ptr + tl.multiple_of(offset - head, ALIGN)
    lanes = tl.arange(0, BLOCK)

    m = -float("inf")  # running max of the raw logits
    s = tl.zeros([BLOCK], dtype=tl.float32)  # per lane Σ 2^t, t relative to m
    a = tl.zeros([BLOCK], dtype=tl.float32)  # per lane Σ 2^t · t (entropy only)
    if RAGGED:  # masked first and last blocks, unmasked 128-bit loads between
        total = head + n_cols
        z = tl.load(x_base + lanes * stride_col, mask=(lanes >= head) & (lanes < total), other=-float("inf"))
        m, s, a = _forward_block(z.to(tl.float32), m, s, a, scale, RETURN_ENTROPY)
        end = (total // BLOCK) * BLOCK
        for start in range(BLOCK, end, BLOCK):
            z = tl.load(x_base + (start + lanes) * stride_col)
            m, s, a = _forward_block(z.to(tl.float32), m, s, a, scale, RETURN_ENTROPY)
        if (end >= BLOCK) & (end < total):
            z = tl.load(x_base + (end + lanes) * stride_col, mask=end + lanes < total, other=-float("inf"))
            m, s, a = _forward_block(z.to(tl.float32), m, s, a, scale, RETURN_ENTROPY)
    else:  # aligned rows, V a multiple of 16: the mask is uniform over each 16 bytes already
        for start in range(0, n_cols, BLOCK):
            cols = start + lanes
            z = tl.load(x_base + cols * stride_col, mask=cols < n_cols, other=-float("inf"))
            m, s, a = _forward_block(z.to(tl.float32), m, s, a, scale, RETURN_ENTROPY)

    log2_sum = tl.log2(tl.sum(s, 0))  # ≥ 0: the max element alone contributes 2^0
    label = tl.load(labels_ptr + row).to(tl.int64)
    in_vocab = (label >= 0) & (label < n_cols)
    z_label = tl.load(x_base + (head + label) * stride_col, mask=in_vocab, other=0.0).to(tl.float32)
    logp = ((z_label - m) * scale - log2_sum) * _LN2
    tl.store(logp_ptr + row, tl.where(in_vocab, logp, float("nan")))
    tl.store(row_max_ptr + row, m)
    tl.store(log2_sum_ptr + row, log2_sum)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, (log2_sum - tl.sum(a, 0) / tl.sum(s, 0)) * _LN2)


@triton.jit
def _backward_block(z, cols, m, log2_sum, label, g_logp, g_entropy, entropy, scale, ENTROPY_GRAD: tl.constexpr):
    """∂L/∂z of one block (float32) from its raw logits `z` at columns `cols`."""
    log2_p = (z - m) * scale - log2_sum
    p = tl.exp2(log2_p)
    grad = g_logp * (tl.where(cols == label, 1.0, 0.0) - p)  # g·(onehot − p)/T
    if ENTROPY_GRAD:
        # −gH·p·(log p + H)/T; p = 0 (a -inf logit) contributes 0, not 0·(−inf)
        grad -= g_entropy * tl.where(p > 0.0, p * (log2_p * _LN2 + entropy), 0.0)
    return grad


@triton.jit
def _logprobs_backward_kernel(
    logits_ptr,  # [N, V] through x strides
    grad_ptr,  # [N, V] out, logits dtype, through g strides (may alias logits_ptr)
    labels_ptr,  # [N] int
    row_max_ptr,  # [N] float32
    log2_sum_ptr,  # [N] float32
    grad_logp_ptr,  # [N] float32: upstream ∂L/∂logp
    entropy_ptr,  # [N] float32 (read when ENTROPY_GRAD)
    grad_entropy_ptr,  # [N] float32: upstream ∂L/∂H (read when ENTROPY_GRAD)
    n_cols,  # V
    x_n_inner,  # row r of x sits at (r // x_n_inner)·x_stride_outer + (r % x_n_inner)·x_stride_inner
    x_stride_outer,
    x_stride_inner,
    x_stride_col,
    g_n_inner,  # the same for the gradient
    g_stride_outer,
    g_stride_inner,
    g_stride_col,
    scale,  # log2(e) / temperature
    inv_temperature,
    ENTROPY_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,  # elements per 16 bytes when the logits' columns are contiguous, else 1
    G_ALIGNED: tl.constexpr,  # the gradient has the logits' row layout and dtype: the same 16-byte phase
    RAGGED: tl.constexpr,  # rows off 16-byte boundaries or V not a multiple of 16
):
    row = tl.program_id(0)
    x_outer, x_inner = (row // x_n_inner).to(tl.int64), (row % x_n_inner).to(tl.int64)
    g_outer, g_inner = (row // g_n_inner).to(tl.int64), (row % g_n_inner).to(tl.int64)
    x_offset = x_outer * x_stride_outer + x_inner * x_stride_inner
    g_offset = g_outer * g_stride_outer + g_inner * g_stride_inner
    # Blocks on 16-byte boundaries, as in the forward: lanes [head, head + V) hold the row.
    head = x_offset % ALIGN if RAGGED else 0
    x_base = logits_ptr + tl.multiple_of(x_offset - head, ALIGN)
    if G_ALIGNED:
        g_base = grad_ptr + tl.multiple_of(g_offset - head, ALIGN)
    else:  # lane l is column l − head
        g_base = grad_ptr + g_offset - head * g_stride_col
    lanes = tl.arange(0, BLOCK)

    m = tl.load(row_max_ptr + row)
    log2_sum = tl.load(log2_sum_ptr + row)
    label = tl.load(labels_ptr + row).to(tl.int64)
    g_logp = tl.load(grad_logp_ptr + row) * inv_temperature
    g_entropy = 0.0
    entropy = 0.0
    if ENTROPY_GRAD:
        g_entropy = tl.load(grad_entropy_ptr + row) * inv_temperature
        entropy = tl.load(entropy_ptr + row)
    out_ty = grad_ptr.dtype.element_ty

    if RAGGED:  # masked first and last blocks, unmasked 128-bit accesses between
        total = head + n_cols
        mask = (lanes >= head) & (lanes < total)
        z = tl.load(x_base + lanes * x_stride_col, mask=mask, other=0.0).to(tl.float32)
        grad = _backward_block(z, lanes - head, m, log2_sum, label, g_logp, g_entropy, entropy, scale,
                               ENTROPY_GRAD)
        tl.store(g_base + lanes * g_stride_col, grad.to(out_ty), mask=mask)
        end = (total // BLOCK) * BLOCK
        for start in range(BLOCK, end, BLOCK):
            z = tl.load(x_base + (start + lanes) * x_stride_col).to(tl.float32)
            grad = _backward_block(z, start + lanes - head, m, log2_sum, label, g_logp, g_entropy, entropy, scale,
                                   ENTROPY_GRAD)
            tl.store(g_base + (start + lanes) * g_stride_col, grad.to(out_ty))
        if (end >= BLOCK) & (end < total):
            mask = end + lanes < total
            z = tl.load(x_base + (end + lanes) * x_stride_col, mask=mask, other=0.0).to(tl.float32)
            grad = _backward_block(z, end + lanes - head, m, log2_sum, label, g_logp, g_entropy, entropy, scale,
                                   ENTROPY_GRAD)
            tl.store(g_base + (end + lanes) * g_stride_col, grad.to(out_ty), mask=mask)
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + lanes
            mask = cols < n_cols
            z = tl.load(x_base + cols * x_stride_col, mask=mask, other=0.0).to(tl.float32)
            grad = _backward_block(z, cols, m, log2_sum, label, g_logp, g_entropy, entropy, scale, ENTROPY_GRAD)
            tl.store(g_base + cols * g_stride_col, grad.to(out_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V ≥ 1, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be logits' without the last dim "
                         f"{tuple(logits.shape[:-1])}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    check_column_offsets(logits, "logits")


def _forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, return_entropy: bool):
    """Launch the forward: → (logp, entropy or None, row_max, log2_sum), all float32 `[...]`."""
    _check(logits, labels)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    shape, device = logits.shape[:-1], logits.device
    labels = labels.contiguous()  # [...] ints: tiny next to the logits
    logp = torch.empty(shape, dtype=torch.float32, device=device)
    entropy = torch.empty(shape, dtype=torch.float32, device=device) if return_entropy else None
    row_max = torch.empty(shape, dtype=torch.float32, device=device)
    log2_sum = torch.empty(shape, dtype=torch.float32, device=device)
    n_cols = logits.shape[-1]
    block, num_warps = vocab_block(n_cols, device)
    scale = LOG2E / float(temperature)
    with device_guard(logits):
        for index, (layout,) in row_pieces(logits):
            n_rows = logp[index].numel()
            if n_rows == 0:
                continue
            launch = aligned_block(block, n_cols, logits, layout)
            _logprobs_forward_kernel[(n_rows,)](
                logits[index], labels[index], logp[index],
                entropy[index] if return_entropy else logp[index],
                row_max[index], log2_sum[index],
                n_cols, *layout, scale,
                RETURN_ENTROPY=return_entropy, BLOCK=launch["BLOCK"], ALIGN=launch["ALIGN"],
                RAGGED=launch["RAGGED"], num_warps=num_warps,
            )
    return logp, entropy, row_max, log2_sum


def _backward(logits, labels, row_max, log2_sum, temperature, grad_logp, entropy=None, grad_entropy=None,
              out=None):
    """Launch the backward: ∂L/∂logits in the logits' dtype, written into `out` (which may be `logits`).

    grad_logp / grad_entropy `[...]` (None = zero); `entropy` is needed with `grad_entropy`.
    """
    shape, device = logits.shape[:-1], logits.device
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=device)
    if grad_logp is None:
        grad_logp = torch.zeros(shape, dtype=torch.float32, device=device)
    # upstream grads may be expanded (stride 0) or views: [...] floats, cheap to make dense
    grad_logp = grad_logp.float().contiguous()
    entropy_grad = grad_entropy is not None
    if entropy_grad:
        grad_entropy = grad_entropy.float().contiguous()
    n_cols = logits.shape[-1]
    block, num_warps = vocab_block(n_cols, device)
    with device_guard(logits):
        for index, (x_layout, g_layout) in row_pieces(logits, out):
            n_rows = row_max[index].numel()
            if n_rows == 0:
                continue
            launch = aligned_block(block, n_cols, logits, x_layout, out, g_layout)
            _logprobs_backward_kernel[(n_rows,)](
                logits[index], out[index], labels[index], row_max[index], log2_sum[index], grad_logp[index],
                entropy[index] if entropy_grad else grad_logp[index],
                grad_entropy[index] if entropy_grad else grad_logp[index],
                n_cols, *x_layout, *g_layout,
                LOG2E / float(temperature), 1.0 / float(temperature),
                ENTROPY_GRAD=entropy_grad, BLOCK=launch["BLOCK"], ALIGN=launch["ALIGN"], RAGGED=launch["RAGGED"],
                G_ALIGNED=launch["OTHER_ALIGNED"], num_warps=num_warps,
            )
    return out


# --------------------------------------------------------------------------- autograd


class LogprobsFromLogits(torch.autograd.Function):
    """logprobs (and entropy) with a recomputing backward; see `logprobs_from_logits`."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, return_entropy, inplace_backward):
        logp, entropy, row_max, log2_sum = _forward(logits, labels, temperature, return_entropy)
        labels = labels.contiguous()
        ctx.save_for_backward(logits, labels, row_max, log2_sum, entropy)
        ctx.temperature = float(temperature)
        ctx.inplace_backward = inplace_backward
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, labels, row_max, log2_sum, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        out = None
        if ctx.inplace_backward:
            out = logits
            # The logits now hold their gradient: a second backward through this graph must fail
            # loudly instead of reading them.
            torch.autograd.graph.increment_version(logits)
        grad = _backward(logits, labels, row_max, log2_sum, ctx.temperature, grad_logp,
                         entropy=entropy, grad_entropy=grad_entropy, out=out)
        return grad, None, None, None, None


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    inplace_backward: bool = False,
):
    """log softmax(logits / temperature)[label] per row, float32; same contract as `fastppo.reference`.

    logits `[..., V]` fp32/bf16/fp16 on CUDA (or CPU under TRITON_INTERPRET=1), any strides —
    a view such as `logits[:, :-1]` is read in place, never copied; labels `[...]` integer.
    Returns logp `[...]` float32 (≤ 0), and with `return_entropy=True` also the entropy
    `[...]` float32. A label outside [0, V) gives NaN (no host sync to check it).

    Differentiable w.r.t. logits (both outputs). The backward recomputes the softmax from
    two saved float32 numbers per row and writes the gradient in the logits' dtype.
    `inplace_backward=True` writes that gradient into the logits' own memory instead of a
    new `[..., V]` tensor: use it only when nothing else needs the logits' values after this
    backward (e.g. logits straight out of the LM head matmul, whose backward does not read
    them) and the logits do not overlap themselves; a second backward through the graph
    then raises. Raises ValueError/TypeError on bad shapes or types.
    """
    if inplace_backward and logits.requires_grad:
        if any(stride == 0 for size, stride in zip(logits.shape, logits.stride()) if size > 1):
            raise ValueError("inplace_backward=True needs logits without stride-0 (expanded) dims")
    return LogprobsFromLogits.apply(logits, labels, temperature, return_entropy, inplace_backward)
