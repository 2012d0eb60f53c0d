"""Non-finite guards: an optimizer step whose gradients (or the outputs behind them) hold NaN/inf is skipped.

The flags are device tensors built without a host sync. A fused torch optimizer (the trainer's default
Adam is one) skips on the device, through the `found_inf` its kernels take (as torch's GradScaler uses
it): the flags are read once, with the step's statistics. Any other optimizer needs the decision on
the host: one read per optimizer step (`PPOConfig.nonfinite_guard=False` removes the guard).
"""

from __future__ import annotations

import contextlib
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


def default_adam(parameters: list, lr: float, fused: bool) -> torch.optim.Optimizer:
    """TRL's optimizer, `Adam(trainable parameters, lr)`; fused (one kernel, and a device-side skip) where
    torch has a fused Adam for every parameter's device and dtype."""
    if fused:
        try:
            return torch.optim.Adam(parameters, lr=lr, fused=True)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            pass
    return torch.optim.Adam(parameters, lr=lr)


def device_skipping_optimizer(optimizer, accelerator) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer under `optimizer` if its step can be skipped on the device (fused kernels take
    `found_inf`), else None. Not with a gradient scaler: it sets `found_inf` itself."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if getattr(accelerator, "scaler", None) is not None or not getattr(inner, "_step_supports_amp_scaling", False):
        return None
    return inner


@contextlib.contextmanager
def skip_if(optimizer: torch.optim.Optimizer, skip: torch.Tensor):
    """Within: `optimizer.step()` changes nothing (weights, state, step count) where `skip` (0-d, device) is True."""
    optimizer.found_inf = skip.float()
    try:
        yield
    finally:
        del optimizer.found_inf
