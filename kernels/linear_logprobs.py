"""Log-probabilities (and entropy) of labels under softmax((hidden @ W.T + b) / T), never holding [N, V] logits.

Math, token n with hidden h_n ∈ R^H, label k, logits z = W h_n + b ∈ R^V, y = z / T:

    logp_n = y_k − lse(y),   H_n = lse(y) − Σ_v p_v y_v,   p = softmax(y)
    G_nv   = ∂L/∂z_nv = g_n (1[v = k] − p_v) / T − gH_n p_v (log p_v + H_n) / T
    ∂L/∂h_n = Σ_v G_nv W_v,   ∂L/∂W = G.T @ hidden,   ∂L/∂b = Σ_n G_n

Forward: the tokens go C = `chunk_size` at a time (default `_launch.linear_logprobs_chunk_size`).
Per chunk, cuBLAS writes the chunk's logits z = h W.T + b, in the input dtype, into one reused
[C, V] buffer (what the model's lm_head would produce), and the Triton logprobs kernel
(kernels/logprobs.py) streams each row once in float32: logp, entropy, and the two float32
numbers per row its backward needs (row max, log2 Σ 2^…), kept for all N tokens.

Backward: with those row statistics G is column-local, so the logits can be walked along
either axis (`_launch.linear_logprobs_backward_tiles`), a tile of about C × V logits at a
time. Per tile: recompute the logits into the buffer, run the logprobs backward kernel *in
place* (the buffer now holds G in the input dtype; labels are shifted by the tile's first
column, so a label outside it matches nothing), then the two gradient matmuls. When N ≤ V
(RLHF: 32k response tokens, a 128k vocabulary) the tiles are all N tokens × ⌊C·V/N⌋ columns:
each grad_W row block G_tile.T @ h is one matmul, summed over all N inside cuBLAS in float32
and rounded once, written straight into the output, and grad_hidden += G_tile @ W_tile sums
over the tiles in a float32 [N, H] accumulator. When N > V the tiles are C-token chunks and
the roles swap (grad_W and grad_b summed in float32 [V, H] and [V]). One tile covers
everything, and nothing is summed, when N ≤ C.

Shapes: hidden [..., H], weight [V, H], labels [...] int, bias [V] or None, one float dtype
→ logp [...] float32 (≤ 0), entropy [...] float32.
Memory beyond inputs and outputs: one buffer of ≤ C·V logits in the input dtype per pass,
12 bytes per token (row max, log2-sum, entropy), and for half-precision inputs a float32
[min(N, V), H] accumulator plus the half-precision product of each tile before it is added.
At DESIGN §6's N = 32768, H = 4096, V = 128256, bf16, C = 1024: 33 tiles of 3968 columns,
a 260 MB buffer, a 537 MB accumulator and a 268 MB product: ~1.07 GB beyond the gradients
(a token-chunked backward would need a 2.1 GB float32 [V, H] and a 1.05 GB product).
FLOPs: 2·N·H·V forward; 6·N·H·V backward (recompute, G @ W, G.T @ h): 8·N·H·V in all.
Bytes (bf16, N·V·2 per pass over the logits): forward writes and reads the logits once
(2 passes); backward writes them (recompute), reads and writes them (epilogue), reads them
twice (the two gradient matmuls): 5 passes. On an H100 (~3 TB/s, ~790 TFLOP/s) at H = 4096
the 7 passes (14 B per logit) cost ~11 % of the 8·H FLOPs per logit. The accumulator is read
and rewritten once per tile, and the bf16 product written and read: 12 B per element and
tile, ~53 GB at the shape above, another ~10 %. Not measured on a GPU yet.

Future work, to measure on a GPU (DESIGN §6: peak extra ≤ 2 GB and ≤ 1.25× the 8·N·H·V
matmul floor at that shape): the accumulation through `addmm(..., out_dtype=torch.float32)`
where the installed torch has it on CUDA (no product temporary, 4 B less per element and
tile); tile and chunk sizes; and a fused Triton matmul variant (the online log-sum-exp in the
matmul's epilogue, logits never written to HBM, vocabulary tiles combined through their LSEs).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _launch
from .logprobs import _backward as _logprobs_backward
from .logprobs import _forward as _logprobs_forward

# --------------------------------------------------------------------------- launchers


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor):
    """out[C, V] = hidden[C, H] @ weight.T (+ bias) in the input dtype, written into `out` (cuBLAS)."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _forward(hidden, weight, bias, labels, temperature: float, return_entropy: bool, chunk_size: int):
    """hidden [N, H], labels [N] → (logp, entropy or None, row_max, log2_sum), float32 [N] each."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    logp = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp) if return_entropy else None
    row_max, log2_sum = torch.empty_like(logp), torch.empty_like(logp)
    buffer = torch.empty(min(chunk_size, n_tokens), vocab, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, n_tokens))
        logits = _chunk_logits(hidden[rows], weight, bias, out=buffer[: rows.stop - start])
        chunk = _logprobs_forward(logits, labels[rows], temperature, return_entropy)
        logp[rows], row_max[rows], log2_sum[rows] = chunk[0], chunk[2], chunk[3]
        if return_entropy:
            entropy[rows] = chunk[1]
    return logp, entropy, row_max, log2_sum


def _backward(hidden, weight, bias, labels, row_max, log2_sum, entropy, temperature: float, chunk_size: int,
              grad_logp, grad_entropy, needs_grad):
    """(grad_hidden, grad_weight, grad_bias), each None where `needs_grad` says so.

    Walks the tiles of `_launch.linear_logprobs_backward_tiles`: per tile, recompute the
    logits, turn them into ∂L/∂z in place, then the two gradient matmuls. The operand whose
    gradient sums over tiles (grad_weight and grad_bias across token chunks, grad_hidden across
    vocabulary tiles) accumulates in float32 and is rounded once; the other is written once.
    """
    needs_hidden, needs_weight, needs_bias = needs_grad
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    split, tiles = _launch.linear_logprobs_backward_tiles(n_tokens, vocab, chunk_size)
    # upstream grads may be expanded (stride 0): [N] floats, cheap to make dense once
    if grad_logp is None:
        grad_logp = torch.zeros(n_tokens, dtype=torch.float32, device=device)
    grad_logp = grad_logp.float().contiguous()
    grad_entropy = grad_entropy.float().contiguous() if grad_entropy is not None else None
    # Written once by a single tile; else summed (zero tiles, N = 0: a zero gradient)
    sum_hidden = len(tiles) != 1 and split == "vocab"
    sum_weight = len(tiles) != 1 and split == "tokens"
    grad_hidden = _gradient(hidden, needs_hidden, sum_hidden)
    grad_weight = _gradient(weight, needs_weight, sum_weight)
    grad_bias = _gradient(bias, needs_bias, sum_weight)
    largest = max(((rows.stop - rows.start) * (cols.stop - cols.start) for rows, cols in tiles), default=0)
    buffer = torch.empty(largest, dtype=hidden.dtype, device=device)  # one tile of logits, reused
    for rows, cols in tiles:
        tile_shape = (rows.stop - rows.start, cols.stop - cols.start)
        tile_bias = bias[cols] if bias is not None else None
        logits = _chunk_logits(hidden[rows], weight[cols], tile_bias,
                               out=buffer[: tile_shape[0] * tile_shape[1]].view(tile_shape))
        # Column-local: p_v comes from the saved row max and log2-sum; a label outside this tile
        # of columns (shifted below 0 or past its width) matches no column.
        tile_labels = labels[rows] - cols.start if cols.start else labels[rows]
        grad_logits = _logprobs_backward(  # in place: the buffer now holds ∂L/∂z in the input dtype
            logits, tile_labels, row_max[rows], log2_sum[rows], temperature, grad_logp[rows],
            entropy=entropy[rows] if grad_entropy is not None else None,
            grad_entropy=grad_entropy[rows] if grad_entropy is not None else None,
            out=logits,
        )
        if needs_hidden:
            _matmul_into(grad_hidden[rows], grad_logits, weight[cols], accumulate=sum_hidden)
        if needs_weight:
            _matmul_into(grad_weight[cols], grad_logits.t(), hidden[rows], accumulate=sum_weight)
        if needs_bias:
            if sum_weight:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
            else:
                grad_bias[cols] = grad_logits.sum(0, dtype=torch.float32)
    return (_rounded(grad_hidden, hidden), _rounded(grad_weight, weight), _rounded(grad_bias, bias))


def _gradient(leaf, needed: bool, summed: bool):
    """The gradient buffer of `leaf`: float32 zeros where tiles sum into it, else its own dtype."""
    if not needed:
        return None
    if summed:
        return torch.zeros(leaf.shape, dtype=torch.float32, device=leaf.device)
    return torch.empty_like(leaf, memory_format=torch.contiguous_format)


def _matmul_into(out, a, b, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b (float32 `out` of half-precision operands: through a product temporary)."""
    if not accumulate:
        torch.mm(a, b, out=out)
    elif out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


def _rounded(grad, leaf):
    return grad.to(leaf.dtype) if grad is not None else None


# --------------------------------------------------------------------------- autograd


class LinearLogprobs(torch.autograd.Function):
    """Chunked linear log-probs (and entropy) with a recomputing backward; see `linear_logprobs`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, return_entropy, chunk_size):
        logp, entropy, row_max, log2_sum = _forward(hidden, weight, bias, labels, temperature, return_entropy,
                                                    chunk_size)
        ctx.save_for_backward(hidden, weight, bias, labels, row_max, log2_sum, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        hidden, weight, bias, labels, row_max, log2_sum, entropy = ctx.saved_tensors
        grads = _backward(hidden, weight, bias, labels, row_max, log2_sum, entropy, ctx.temperature,
                          ctx.chunk_size, grad_logp, grad_entropy, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
):
    """log softmax((hidden @ weight.T + bias) / T)[label] per token; same contract as `fastppo.reference`.

    hidden `[..., H]`, weight `[V, H]`, bias `[V]` or None (one float dtype, CUDA — or CPU
    under TRITON_INTERPRET=1), labels `[...]` integer. Returns logp `[...]` float32 (≤ 0), and
    with `return_entropy=True` also the entropy `[...]` float32. A label outside [0, V) gives
    NaN. Memory: one `[chunk_size, V]` logits buffer per pass, never `[N, V]`. Differentiable
    w.r.t. hidden, weight and bias (cuBLAS matmuls per chunk, Triton log-softmax epilogue with
    an in-place backward). Raises ValueError on bad shapes or a non-positive temperature.
    """
    if hidden.dim() < 1 or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be hidden's without the last dim "
                         f"{tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}] with V ≥ 1, got {tuple(weight.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    lead_shape = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])  # a view where it can be; [N, H] ≪ [N, V] where not
    labels1d = labels.reshape(-1).contiguous()
    if chunk_size is None:
        chunk_size = _launch.linear_logprobs_chunk_size(hidden2d.shape[0], weight.shape[0], hidden.device)
    out = LinearLogprobs.apply(hidden2d, weight, bias, labels1d, float(temperature), return_entropy,
                               max(1, int(chunk_size)))
    if return_entropy:
        return out[0].reshape(lead_shape), out[1].reshape(lead_shape)
    return out.reshape(lead_shape)
