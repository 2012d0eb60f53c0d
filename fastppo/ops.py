"""fastppo's public functional API, and the one place that picks a backend.

Each op checks its arguments, then runs either the Triton kernel (`fastppo.kernels`) or
the eager reference (`fastppo.reference`). Backend choice:

- ``"torch"``: always the reference.
- ``"triton"``: the kernel; where it cannot run (no triton, CPU tensors without
  ``TRITON_INTERPRET=1``, no kernel for the op) a `RuntimeError`, never a silent fallback.
- ``"auto"`` (default): the environment variable ``FASTPPO_BACKEND`` if set, else Triton
  for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) when triton imports and
  the op has a kernel, else the reference.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Callable, Optional

import torch

from . import reference
from .config import BACKENDS
from .op_outputs import IMPORTANCE_SAMPLING_LEVELS, PPOLossOutput, PPOLossSettings, resolve_settings

__all__ = [
    "PPOLossOutput",
    "PPOLossSettings",
    "full_kl",
    "gae",
    "kl_penalty_rewards",
    "linear_logprobs",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_loss",
    "resolve_backend",
]

ENV_BACKEND = "FASTPPO_BACKEND"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton does not import ({exc})"
    return None


def _triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on `device`, or None if it can."""
    error = _triton_import_error()
    if error is not None:
        return error
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; got a {device.type} tensor"


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend ("torch" or "triton") an op with tensors on `device` runs on, for the requested one."""
    requested = backend or "auto"
    if requested == "auto":
        requested = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if requested not in BACKENDS:
        source = f"${ENV_BACKEND}" if backend in (None, "auto") else "backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    reason = _triton_unavailable_reason(torch.device(device))
    if requested == "triton" and reason is not None:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    return "triton" if reason is None else "torch"


def _kernel(op: str) -> Optional[Callable]:
    """The Triton implementation of `op`, or None while no kernel exists for it."""
    from fastppo.kernels import kernel_for  # imports triton, so only once Triton was chosen

    return kernel_for(op)


def _implementation(op: str, backend: Optional[str], device: torch.device) -> Callable:
    requested = backend or "auto"
    if resolve_backend(backend, device) == "triton":
        kernel = _kernel(op)
        if kernel is not None:
            return kernel
        explicit = requested == "triton" or (requested == "auto" and os.environ.get(ENV_BACKEND) == "triton")
        if explicit:
            raise RuntimeError(f"backend='triton': fastppo has no Triton kernel for {op} yet; use backend='torch'")
    return getattr(reference, op)


# --------------------------------------------------------------------------- checks


def _check_tensor(name: str, value, ndim: Optional[int] = None, floating: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def _check_same(names_and_tensors) -> None:
    (first_name, first), *rest = names_and_tensors
    for name, tensor in rest:
        if tensor.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(tensor.shape)}")
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")


def _check_token_tensors(names_and_tensors: list, floating: tuple = ()) -> None:
    """[B, T] inputs: all 2-D, one shape and device; floats where named."""
    for name, tensor in names_and_tensors:
        _check_tensor(name, tensor, ndim=2, floating=name in floating)
    _check_same(names_and_tensors)


# --------------------------------------------------------------------------- ops


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: Optional[str] = None,
    inplace_backward: bool = False,
):
    """Log-probability of each label under softmax(logits / temperature), float32.

    logits `[..., V]` (fp32/bf16/fp16, may be a non-contiguous view such as
    `logits[:, :-1]`), labels `[...]` integer → `[...]` float32 (≤ 0); with
    `return_entropy=True`, also the entropy `[...]`. Differentiable w.r.t. logits.
    `inplace_backward=True` lets the Triton backend write the logits' gradient into the
    logits' own memory (one `[..., V]` buffer less; the logits must not be needed after this
    backward, as with an LM head's output); the torch backend ignores it.
    Raises TypeError/ValueError on wrong types or shapes.
    """
    _check_tensor("logits", logits, floating=True)
    _check_tensor("labels", labels)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without its last dim {tuple(logits.shape[:-1])}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    impl = _implementation("logprobs_from_logits", backend, logits.device)
    return impl(logits, labels, temperature=temperature, return_entropy=return_entropy,
                inplace_backward=inplace_backward)


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """Exact per-position KL(softmax(logits) ‖ softmax(ref_logits)): two `[..., V]` → float32 `[...]`. No gradient."""
    _check_tensor("logits", logits, floating=True)
    _check_tensor("ref_logits", ref_logits, floating=True)
    _check_same([("logits", logits), ("ref_logits", ref_logits)])
    impl = _implementation("full_kl", backend, logits.device)
    with torch.no_grad():
        return impl(logits, ref_logits)


def kl_penalty_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    kl_coef: float,
    estimator: str = "kl",
    kl: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """Per-token PPO rewards: −kl_coef·KL estimate on response tokens, score added at each row's last one.

    logprobs, ref_logprobs, mask `[B, T]`, scores `[B]` → (rewards, kl) `[B, T]` float32.
    estimator: "kl", "abs", "mse", "k3", or "full" with the exact KL passed as `kl` `[B, T]`.
    """
    _check_token_tensors([("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask)],
                         floating=("logprobs", "ref_logprobs"))
    _check_tensor("scores", scores, ndim=1, floating=True)
    if scores.shape[0] != logprobs.shape[0] or scores.device != logprobs.device:
        raise ValueError(f"scores must be [B]={logprobs.shape[0]} on {logprobs.device}, got {tuple(scores.shape)} on {scores.device}")
    if estimator not in reference.KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {reference.KL_ESTIMATORS}, got {estimator!r}")
    if estimator == "full":
        if kl is None:
            raise ValueError("estimator='full' needs kl=full_kl(logits, ref_logits)")
        _check_token_tensors([("logprobs", logprobs), ("kl", kl)], floating=("kl",))
    impl = _implementation("kl_penalty_rewards", backend, logprobs.device)
    with torch.no_grad():
        return impl(logprobs, ref_logprobs, mask, scores, float(kl_coef), estimator, kl)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    backend: Optional[str] = None,
):
    """Generalised advantage estimation per row (TRL-classic masking): `[B, T]` ×3 → (advantages, returns) float32."""
    _check_token_tensors([("rewards", rewards), ("values", values), ("mask", mask)], floating=("rewards", "values"))
    impl = _implementation("gae", backend, rewards.device)
    with torch.no_grad():
        return impl(rewards, values, mask, float(gamma), float(lam))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions (0-d float32)."""
    return reference.masked_mean(values, mask)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked positions (0-d float32), Bessel-corrected when `unbiased`."""
    return reference.masked_var(values, mask, unbiased)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, backend: Optional[str] = None
) -> torch.Tensor:
    """Whiten `values` with the mean and variance of its masked positions; same shape, float32."""
    _check_tensor("values", values, floating=True)
    _check_same([("values", values), ("mask", mask)])
    impl = _implementation("masked_whiten", backend, values.device)
    with torch.no_grad():
        return impl(values, mask, shift_mean)


def _check_cliprange(cliprange):
    """A number ≥ 0 (as a float) or a `(low, high)` pair of them (as a tuple of floats); ValueError otherwise."""
    pair = isinstance(cliprange, (tuple, list)) and len(cliprange) == 2
    parts = tuple(cliprange) if pair else (cliprange,)
    if not all(isinstance(c, numbers.Real) and not isinstance(c, bool) and not math.isnan(c) and c >= 0
               for c in parts):
        raise ValueError(f"cliprange must be a number >= 0 or a (low, high) pair of them, got {cliprange!r}")
    return tuple(float(c) for c in parts) if pair else float(cliprange)


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
    backend: Optional[str] = None,
    dual_clip: Optional[float] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    rollout_is_cap: Optional[float] = None,
    *,
    settings: Optional[PPOLossSettings] = None,
    loss_weights: Optional[torch.Tensor] = None,
) -> PPOLossOutput:
    """Clipped policy loss + vf_coef × clipped value loss over masked `[B, T]` tokens.

    Returns a `PPOLossOutput` (losses with gradient w.r.t. logprobs and values, plus the
    mini-batch statistics). All inputs `[B, T]`, one device. The scalar options come either as the
    arguments below or as one `settings=PPOLossSettings(...)` record (which also holds
    `importance_sampling_level`), not both. `cliprange`: ε ≥ 0 (the ratio clipped to [1 − ε, 1 + ε], TRL's)
    or a pair `(low, high)` for [1 − low, 1 + high] (DAPO's clip-higher: high > low). `dual_clip` = c > 1
    bounds the loss of negative-advantage tokens at −A·c (dual-clip PPO); None is TRL's loss.
    `rollout_logprobs` `[B, T]` (float): the log-probs of the engine that sampled the tokens
    (e.g. vLLM); given, each token's policy loss is weighted by the truncated importance weight
    min(exp(old_logprobs − rollout_logprobs), rollout_is_cap) (default cap 2.0; no gradient through it), and
    `tis_weight_mean` / `tis_clipfrac` report it; None (default) leaves the loss as it was.
    `loss_weights` `[B, T]` (float, e.g. `reference.loss_aggregation_weights`): the losses become Σ m·w·ℓ
    instead of masked token means. `importance_sampling_level="sequence"`: GSPO's per-response ratio.
    Raises TypeError/ValueError naming the argument on wrong types, shapes, devices or values.
    """
    names = [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("values", values),
             ("old_values", old_values), ("advantages", advantages), ("returns", returns), ("mask", mask)]
    _check_token_tensors(names, floating=tuple(name for name, _ in names[:-1]))
    for name, tensor in (("rollout_logprobs", rollout_logprobs), ("loss_weights", loss_weights)):
        if tensor is not None:
            _check_token_tensors([("logprobs", logprobs), (name, tensor)], floating=(name,))
    settings = _check_settings(resolve_settings(settings, cliprange, cliprange_value, vf_coef, dual_clip,
                                                rollout_is_cap))
    impl = _implementation("ppo_loss", backend, logprobs.device)
    return impl(logprobs, old_logprobs, values, old_values, advantages, returns, mask, settings=settings,
                rollout_logprobs=rollout_logprobs, loss_weights=loss_weights)


def _check_settings(settings: PPOLossSettings) -> PPOLossSettings:
    """`settings` with its numbers as floats; ValueError/TypeError naming the field that is wrong."""
    dual_clip, cap = settings.dual_clip, settings.rollout_is_cap
    if dual_clip is not None and not (isinstance(dual_clip, numbers.Real) and not isinstance(dual_clip, bool)
                                      and dual_clip > 1):
        raise ValueError(f"dual_clip must be a number > 1 or None, got {dual_clip!r}")
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
        raise TypeError(f"rollout_is_cap must be a number, got {type(cap).__name__}")
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"rollout_is_cap must be a finite number > 0, got {cap!r}")
    for name in ("cliprange_value", "vf_coef"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if settings.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {settings.importance_sampling_level!r}")
    return settings._replace(cliprange=_check_cliprange(settings.cliprange),
                             cliprange_value=float(settings.cliprange_value), vf_coef=float(settings.vf_coef),
                             dual_clip=None if dual_clip is None else float(dual_clip), rollout_is_cap=float(cap))


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
):
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / T), never holding `[N, V]` logits.

    hidden `[..., H]` and weight `[V, H]` (nn.Linear layout, e.g. the LM head) of one float
    dtype, labels `[...]` integer, bias `[V]` or None → `[...]` float32 (≤ 0); with
    `return_entropy=True`, also the entropy `[...]`. Tokens go `chunk_size` at a time (None:
    a default sized so one chunk's logits stay ~256 MB on a GPU); each chunk's logits are the
    matmul in the input dtype, upcast to float32 for the log-softmax, and are recomputed in
    backward, tiles of as many logits walking the vocabulary when N ≤ V (the float32 gradient
    accumulator is then `[N, H]`, not `[V, H]`). Differentiable w.r.t. hidden, weight and
    bias. Raises TypeError/ValueError
    naming the argument on wrong types, dtypes, shapes or devices.
    """
    _check_tensor("hidden", hidden, floating=True)
    _check_tensor("weight", weight, ndim=2, floating=True)
    _check_tensor("labels", labels)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if hidden.dim() < 1 or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden shape without its last dim "
                         f"{tuple(hidden.shape[:-1])}")
    if weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with V ≥ 1 and H = hidden's last dim {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    named = [("weight", weight), ("labels", labels)]
    if bias is not None:
        _check_tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
        named.append(("bias", bias))
    for name, tensor in named:
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    impl = _implementation("linear_logprobs", backend, hidden.device)
    return impl(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy,
                chunk_size=chunk_size)
