"""Checks of what users hand to `PPOTrainer.step` and `generate`.

Everything here runs before the trainer touches any state, so bad input raises a
`TypeError`/`ValueError` naming the argument and leaves weights, optimizer state, KL
coefficient and running moments as they were. Tensors may live on the CPU or on the
trainer's device; any other device is an error.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence

import torch


class StepInputs(NamedTuple):
    queries: list  # B × [Lq] int64 on the trainer's device
    responses: list  # B × [Lr]
    scores: torch.Tensor  # [B] float32
    response_masks: Optional[list]  # B × [Lr] or None
    rollout_logprobs: Optional[list]  # B × [Lr] float32 or None


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index filled in: "cuda" and "cuda:0" are one device when 0 is the current one."""
    if device.index is not None or device.type in ("cpu", "meta"):
        return device
    return torch.device(device.type, getattr(torch, device.type).current_device())


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` moved to `device`; CPU tensors move, tensors on another accelerator are an error."""
    if tensor.device.type == "cpu" or _indexed(tensor.device) == _indexed(device):
        return tensor.to(device)
    raise ValueError(f"{name} is on {tensor.device}, but the trainer runs on {device}; pass CPU tensors or tensors on {device}")


def check_token_ids(name: str, tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """One 1-D, non-empty integer tensor of ids in [0, vocab_size), returned as int64 on `device`."""
    checked = _token_tensor(name, tensor, device)
    _check_vocabulary([name], [checked], vocab_size)
    return checked


def check_token_list(name: str, value, vocab_size: int, device: torch.device, batch_size: Optional[int] = None) -> list:
    """A list of 1-D token-id tensors (see `check_token_ids`), of `batch_size` items if given."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of 1-D token-id tensors, got {type(value).__name__}")
    if batch_size is not None and len(value) != batch_size:
        raise ValueError(f"{name} has {len(value)} items but config.batch_size is {batch_size}")
    if len(value) == 0:
        raise ValueError(f"{name} is an empty list")
    names = [f"{name}[{i}]" for i in range(len(value))]
    checked = [_token_tensor(item_name, tensor, device) for item_name, tensor in zip(names, value)]
    _check_vocabulary(names, checked, vocab_size)
    return checked


def _token_tensor(name: str, tensor, device: torch.device) -> torch.Tensor:
    """Type, dtype, shape and device checks of one sequence (no host sync)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tensor).__name__}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one sequence of token ids), got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty; every sequence needs at least one token")
    return check_device(name, tensor, device).long()


def _check_vocabulary(names: list, tensors: list, vocab_size: int) -> None:
    """All ids in [0, vocab_size): one host sync for the whole list; the slow path names the culprit."""
    ids = torch.cat(tensors)
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        for name, tensor in zip(names, tensors):
            low, high = int(tensor.min()), int(tensor.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"{name} holds token ids in [{low}, {high}], outside the model's vocabulary "
                                 f"[0, {vocab_size})")


def check_scores(scores, batch_size: int, device: torch.device) -> torch.Tensor:
    """Scores as a list of scalars (0-d or one-element tensors, or numbers) or a 1-D tensor → `[B]` float32."""
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 1:
            raise ValueError(f"scores must be a list of scalars or a 1-D tensor, got a tensor of shape {tuple(scores.shape)}")
        items = list(scores.unbind(0))
    elif isinstance(scores, (list, tuple)):
        items = list(scores)
    else:
        raise TypeError(f"scores must be a list of scalar tensors or a 1-D tensor, got {type(scores).__name__}")
    if len(items) != batch_size:
        raise ValueError(f"scores has {len(items)} items but config.batch_size is {batch_size}")
    values = []
    for i, item in enumerate(items):
        name = f"scores[{i}]"
        if isinstance(item, torch.Tensor):
            if item.numel() != 1 or item.dim() > 1:
                raise ValueError(f"{name} must be a scalar (0-d or one-element tensor), got shape {tuple(item.shape)}")
            if item.dtype == torch.bool or item.is_complex():
                raise TypeError(f"{name} must be a real number, got dtype {item.dtype}")
            values.append(check_device(name, item, device).reshape(()).float())
        elif isinstance(item, numbers.Real) and not isinstance(item, bool):
            values.append(torch.tensor(float(item), device=device))
        else:
            raise TypeError(f"{name} must be a scalar tensor or a number, got {type(item).__name__}")
    scores = torch.stack(values)
    finite = torch.isfinite(scores)
    if not bool(finite.all()):  # one host sync for the batch
        i = int((~finite).nonzero()[0, 0])
        raise ValueError(f"scores[{i}] is {float(scores[i])}; scores must be finite")
    return scores


def check_response_masks(response_masks, responses: Sequence[torch.Tensor], device: torch.device) -> Optional[list]:
    """Optional per-response 0/1 masks, each the length of its response and not all zero."""
    if response_masks is None:
        return None
    if not isinstance(response_masks, (list, tuple)):
        raise TypeError(f"response_masks must be a list of 1-D tensors or None, got {type(response_masks).__name__}")
    if len(response_masks) != len(responses):
        raise ValueError(f"response_masks has {len(response_masks)} items but responses has {len(responses)}")
    checked = []
    for i, (mask, response) in enumerate(zip(response_masks, responses)):
        name = f"response_masks[{i}]"
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != response.shape:
            raise ValueError(f"{name} has shape {tuple(mask.shape)} but responses[{i}] has shape {tuple(response.shape)}")
        checked.append(check_device(name, mask, device))
    # Value checks on the whole batch at once: one host sync unless something is wrong.
    flat = torch.cat(checked)
    counts = torch.stack([mask.ne(0).sum() for mask in checked])
    if not bool(((flat == 0) | (flat == 1)).all()) or not bool((counts > 0).all()):
        for i, mask in enumerate(checked):
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"response_masks[{i}] must hold only 0 and 1")
            if not bool(mask.any()):
                raise ValueError(f"response_masks[{i}] masks out every token of responses[{i}]; at least one must count")
    return [mask.long() for mask in checked]


def check_rollout_logprobs(rollout_logprobs, responses: Sequence[torch.Tensor], device: torch.device) -> Optional[list]:
    """Optional per-response float log-probs from the rollout engine: each the shape of its response,
    finite and ≤ 0 → float32 on `device`."""
    if rollout_logprobs is None:
        return None
    if not isinstance(rollout_logprobs, (list, tuple)):
        raise TypeError(f"rollout_logprobs must be a list of 1-D float tensors or None, got {type(rollout_logprobs).__name__}")
    if len(rollout_logprobs) != len(responses):
        raise ValueError(f"rollout_logprobs has {len(rollout_logprobs)} items but responses has {len(responses)}")
    checked = []
    for i, (logprobs, response) in enumerate(zip(rollout_logprobs, responses)):
        name = f"rollout_logprobs[{i}]"
        if not isinstance(logprobs, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(logprobs).__name__}")
        if not logprobs.is_floating_point():
            raise TypeError(f"{name} must hold floating-point log-probs, got dtype {logprobs.dtype}")
        if logprobs.shape != response.shape:
            raise ValueError(f"{name} has shape {tuple(logprobs.shape)} but responses[{i}] has shape {tuple(response.shape)}")
        checked.append(check_device(name, logprobs, device).float())
    flat = torch.cat(checked)
    if not bool((torch.isfinite(flat) & (flat <= 0)).all()):  # one host sync for the batch
        for i, logprobs in enumerate(checked):
            bad = ~(torch.isfinite(logprobs) & (logprobs <= 0))
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise ValueError(f"rollout_logprobs[{i}][{j}] is {float(logprobs[j])}; log-probs must be finite and <= 0")
    return checked


def check_lengths(names: str, lengths: Sequence[int], max_length: Optional[int], what: str = "tokens") -> None:
    """ValueError naming the first `names[i]` whose length passes the model's `max_length` positions."""
    if max_length is None:
        return
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(f"{names.format(i=index)} is {length} {what}, longer than the model's "
                             f"{max_length} positions (its config's max_position_embeddings)")


def check_generation_lengths(queries: list, single: bool, length_sampler, generation_kwargs: dict,
                             max_length: Optional[int]) -> None:
    """Each query + the most new tokens `generate` is asked for must fit the model's `max_length` positions."""
    values = getattr(length_sampler, "values", None)  # core.LengthSampler's range
    most = max(values) if length_sampler is not None and values else generation_kwargs.get("max_new_tokens")
    name = "query_tensor" if single else "query_tensor[{i}]"
    if isinstance(most, int):
        source = "length_sampler's longest" if length_sampler is not None else "max_new_tokens"
        check_lengths(f"{name} + {source} ({most})", [len(q) + most for q in queries], max_length)
    elif isinstance(generation_kwargs.get("max_length"), int):
        check_lengths("max_length", [generation_kwargs["max_length"]], max_length)


def check_step_inputs(queries, responses, scores, response_masks, batch_size: int, vocab_size: int,
                      device: torch.device, rollout_logprobs=None, max_length: Optional[int] = None,
                      rollout_correction: Optional[str] = None) -> StepInputs:
    """All of `step`'s arguments, checked and moved to `device`; each query + response at most `max_length`;
    `rollout_logprobs` required by a `rollout_correction`."""
    queries = check_token_list("queries", queries, vocab_size, device, batch_size)
    responses = check_token_list("responses", responses, vocab_size, device, batch_size)
    check_lengths("queries[{i}] + responses[{i}]", [len(q) + len(r) for q, r in zip(queries, responses)], max_length)
    scores = check_scores(scores, batch_size, device)
    masks = check_response_masks(response_masks, responses, device)
    rollout_logprobs = check_rollout_logprobs(rollout_logprobs, responses, device)
    if rollout_correction is not None and rollout_logprobs is None:
        raise ValueError(f"rollout_logprobs: config.rollout_correction={rollout_correction!r} needs the rollout "
                         "engine's log-probs; pass those of generate(..., return_logprobs=True)")
    return StepInputs(queries, responses, scores, masks, rollout_logprobs)
