"""Non-finite guards: an optimizer step whose gradients (or the outputs behind them) hold NaN/inf is skipped.

The flags are device tensors built without a host sync; the trainer reads them once per optimizer
step, right before deciding to step (the guard's one sync; `PPOConfig.nonfinite_guard=False` removes it).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

# What the flags name, in the order a NaN travels: the forward's outputs, then the loss, then the gradients.
SOURCES = ("logits", "values", "loss", "grad norm")


def output_flags(logprobs: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """`[3]` bool: a non-finite log-prob (from the logits) or value on a trained position, a non-finite loss."""
    trained = mask.bool()
    return torch.stack([
        (~torch.isfinite(logprobs.detach()) & trained).any(),
        (~torch.isfinite(values.detach()) & trained).any(),
        ~torch.isfinite(loss.detach()),
    ])


def total_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients (0-d, device), read-only; a sharded (DTensor) norm is made whole."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def first_source(flags: list) -> Optional[str]:
    """The name of the first raised flag (SOURCES order), or None when all are clear."""
    return next((name for name, raised in zip(SOURCES, flags) if raised), None)


def first_nonfinite(named_tensors) -> Optional[str]:
    """The name of the first floating tensor of `(name, tensor)` pairs holding NaN/inf, or None (one host sync)."""
    named = [(name, tensor) for name, tensor in named_tensors if tensor.is_floating_point()]
    if not named:
        return None
    device = named[0][1].device
    bad = torch.stack([(~torch.isfinite(tensor.detach())).any().to(device) for _, tensor in named]).tolist()
    return next((name for (name, _), raised in zip(named, bad) if raised), None)


def describe(indices: range, source: str) -> str:
    """"the logits of mini-batch 3" / "the grad norm of mini-batches 2-3" (one optimizer step's mini-batches)."""
    where = f"mini-batch {indices[0]}" if len(indices) == 1 else f"mini-batches {indices[0]}-{indices[-1]}"
    return f"the {source} of {where}"
