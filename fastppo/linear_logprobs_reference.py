"""The eager reference of `ops.linear_logprobs` (exported as `fastppo.reference.linear_logprobs`): log-probs
from hidden states and an LM head weight through a chunked autograd Function that never holds `[N, V]` logits.

A module of its own because the memory-bounded backward is most of it; the math is `reference.py`'s
`logprobs_from_logits` of `hidden @ weight.T + bias`.
"""

from __future__ import annotations

from typing import Optional

import torch

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
