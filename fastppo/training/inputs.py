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

from . import host_index, padding
from .agreement import read_verdicts


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


def _check_reachable(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """ValueError unless `tensor` is on the CPU or on `device` (moved later, with the others: `move_all`)."""
    if tensor.device.type == "cpu" or _indexed(tensor.device) == _indexed(device):
        return
    raise ValueError(f"{name} is on {tensor.device}, but the trainer runs on {device}; pass CPU tensors or tensors on {device}")


def move_all(tensors: Sequence[torch.Tensor], device: torch.device, dtype: Optional[torch.dtype] = None) -> list:
    """`tensors` (checked with `_check_reachable`) as `dtype` (None: the first one's) on `device`; those on the CPU
    travel together, in one copy through pinned memory (a copy per tensor would make the host wait each time)."""
    on_host = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
    dtype = tensors[0].dtype if dtype is None else dtype
    moved = [t.to(dtype) for t in tensors]
    if torch.device(device).type == "cpu" or not on_host:
        return [t.to(device) for t in moved]
    flat = host_index.to_device(torch.cat([moved[i].reshape(-1) for i in on_host]).numpy(), device)
    for i, part in zip(on_host, flat.split([moved[i].numel() for i in on_host])):
        moved[i] = part.view(moved[i].shape)
    return moved


def check_token_list(name: str, value, device: torch.device, batch_size: Optional[int] = None) -> list:
    """A list of 1-D, non-empty integer tensors as int64 on `device`, of `batch_size` items if given (the ids'
    range is the caller's to check, with the other values in one read: `out_of_vocabulary`)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of 1-D token-id tensors, got {type(value).__name__}")
    if batch_size is not None and len(value) != batch_size:
        raise ValueError(f"{name} has {len(value)} items but config.batch_size is {batch_size}")
    if len(value) == 0:
        raise ValueError(f"{name} is an empty list")
    names = [f"{name}[{i}]" for i in range(len(value))]
    return move_all([_token_tensor(item_name, tensor, device) for item_name, tensor in zip(names, value)],
                    device, torch.long)


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
    _check_reachable(name, tensor, device)
    return tensor


def out_of_vocabulary(tensors: list, vocab_size: int) -> torch.Tensor:
    """Whether any id lies outside [0, vocab_size) (0-d bool, on the device: not read here)."""
    ids = torch.cat(tensors)
    return ((ids < 0) | (ids >= vocab_size)).any()


def _check_vocabulary(names: list, tensors: list, vocab_size: int, known_bad: bool) -> None:
    """All ids in [0, vocab_size), given `known_bad` (read with the other values): the slow path names the culprit."""
    if known_bad:
        for name, tensor in zip(names, tensors):
            low, high = int(tensor.min()), int(tensor.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"{name} holds token ids in [{low}, {high}], outside the model's vocabulary "
                                 f"[0, {vocab_size})")


def _check_finite_scores(scores: torch.Tensor, known_bad: bool) -> None:
    if known_bad:
        i = int((~torch.isfinite(scores)).nonzero()[0, 0])
        raise ValueError(f"scores[{i}] is {float(scores[i])}; scores must be finite")


def _score_tensor(scores, batch_size: int, device: torch.device) -> torch.Tensor:
    """Scores as a list of scalars (0-d or one-element tensors, or numbers) or a 1-D tensor → `[B]` float32 on
    `device` (finite: checked with the batch's values in `check_step_inputs`)."""
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
            _check_reachable(name, item, device)
            values.append(item.reshape(()))
        elif isinstance(item, numbers.Real) and not isinstance(item, bool):
            values.append(torch.tensor(float(item)))
        else:
            raise TypeError(f"{name} must be a scalar tensor or a number, got {type(item).__name__}")
    return torch.stack(move_all(values, device, torch.float32))


def _per_response(argument: str, values, responses: Sequence[torch.Tensor], device: torch.device, what: str,
                  floating: Optional[str] = None) -> list:
    """`values` as a list of one tensor per response, each of its response's shape, on the CPU or `device`
    (floating point where `floating` names what they hold)."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{argument} must be a list of 1-D {what} or None, got {type(values).__name__}")
    if len(values) != len(responses):
        raise ValueError(f"{argument} has {len(values)} items but responses has {len(responses)}")
    for i, (value, response) in enumerate(zip(values, responses)):
        name = f"{argument}[{i}]"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if floating is not None and not value.is_floating_point():
            raise TypeError(f"{name} must hold floating-point {floating}, got dtype {value.dtype}")
        if value.shape != response.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} but responses[{i}] has shape "
                             f"{tuple(response.shape)}")
        _check_reachable(name, value, device)
    return list(values)


def check_response_masks(response_masks, responses: Sequence[torch.Tensor], device: torch.device) -> Optional[list]:
    """Optional per-response masks, each the shape of its response, moved to `device`
    as float64 (their values, 0/1 and not all zero, are checked with the batch's in `check_step_inputs`)."""
    if response_masks is None:
        return None
    checked = _per_response("response_masks", response_masks, responses, device, "tensors")
    return move_all(checked, device, torch.float64)  # exact for 0/1 of any dtype, and shows a 0.5


def bad_response_masks(masks: list) -> torch.Tensor:
    """Whether any mask holds a value other than 0/1 or masks out its whole response (0-d bool, not read)."""
    flat = torch.cat(masks)
    counts = torch.stack([mask.ne(0).sum() for mask in masks])
    return ~((flat == 0) | (flat == 1)).all() | ~(counts > 0).all()


def _check_response_mask_values(checked: list, known_bad: bool) -> None:
    if known_bad:
        for i, mask in enumerate(checked):
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"response_masks[{i}] must hold only 0 and 1")
            if not bool(mask.any()):
                raise ValueError(f"response_masks[{i}] masks out every token of responses[{i}]; at least one must count")


def check_rollout_logprobs(rollout_logprobs, responses: Sequence[torch.Tensor], device: torch.device) -> Optional[list]:
    """Optional per-response float log-probs from the rollout engine, each the shape of its response → float32 on
    `device` (their values, finite and ≤ 0, are checked with the batch's in `check_step_inputs`)."""
    if rollout_logprobs is None:
        return None
    checked = _per_response("rollout_logprobs", rollout_logprobs, responses, device, "float tensors",
                            floating="log-probs")
    return move_all(checked, device, torch.float32)


def bad_rollout_logprobs(logprobs: list) -> torch.Tensor:
    """Whether any log-prob is non-finite or positive (0-d bool, not read)."""
    flat = torch.cat(logprobs)
    return ~(torch.isfinite(flat) & (flat <= 0)).all()


def _check_rollout_logprob_values(checked: list, known_bad: bool) -> None:
    if known_bad:
        for i, logprobs in enumerate(checked):
            bad = ~(torch.isfinite(logprobs) & (logprobs <= 0))
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise ValueError(f"rollout_logprobs[{i}][{j}] is {float(logprobs[j])}; log-probs must be finite and <= 0")


def check_lengths(names: str, lengths: Sequence[int], max_length: Optional[int], what: str = "tokens") -> None:
    """ValueError naming the first `names[i]` whose length passes the model's `max_length` positions."""
    if max_length is None:
        return
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(f"{names.format(i=index)} is {length} {what}, longer than the model's "
                             f"{max_length} positions (its config's max_position_embeddings)")


def check_queries(query_tensor, device: torch.device) -> tuple:
    """`generate`'s query (a 1-D tensor) or queries (a list of them) → `(names, int64 tensors on device)`; their
    ids are checked against the vocabulary by `check_query_ids`, after every host-side check of `generate`."""
    if isinstance(query_tensor, torch.Tensor):
        return ["query_tensor"], move_all([_token_tensor("query_tensor", query_tensor, device)], device, torch.long)
    queries = check_token_list("query_tensor", query_tensor, device)
    return [f"query_tensor[{i}]" for i in range(len(queries))], queries


def check_query_ids(names: list, queries: list, vocab_size: int, agree=read_verdicts) -> None:
    """The queries' ids in [0, vocab_size): one read (through `agree`, see `check_step_inputs`)."""
    bad = agree(out_of_vocabulary(queries, vocab_size)[None])
    _check_vocabulary(names, queries, vocab_size, bad[0])


def check_generate_options(batch_size, return_logprobs, encoder_decoder: bool) -> None:
    """`generate`'s `batch_size` (a positive int) and `return_logprobs` (a bool; not for encoder-decoder models)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"return_logprobs must be True or False, got {return_logprobs!r}")
    if encoder_decoder and return_logprobs:
        raise ValueError("return_logprobs: not supported for encoder-decoder models")


def check_generation_lengths(queries: list, single: bool, length_sampler, generation_kwargs: dict,
                             max_length: Optional[int], encoder_decoder: bool = False) -> None:
    """Each query + the most new tokens `generate` is asked for must fit the model's `max_length` positions
    (`encoder_decoder`: each query, the encoder's input)."""
    values = getattr(length_sampler, "values", None)  # core.LengthSampler's range
    most = max(values) if length_sampler is not None and values else generation_kwargs.get("max_new_tokens")
    name = "query_tensor" if single else "query_tensor[{i}]"
    if encoder_decoder:
        check_lengths(name, [len(q) for q in queries], max_length)
    elif isinstance(most, int):
        source = "length_sampler's longest" if length_sampler is not None else "max_new_tokens"
        check_lengths(f"{name} + {source} ({most})", [len(q) + most for q in queries], max_length)
    elif isinstance(generation_kwargs.get("max_length"), int):
        check_lengths("max_length", [generation_kwargs["max_length"]], max_length)


def _check_decoder_rows(queries: list, responses: list, max_length: Optional[int], rollout_logprobs) -> None:
    check_lengths("queries[{i}]", [len(q) for q in queries], max_length)
    check_lengths("responses[{i}]", [len(r) for r in responses], max_length)
    for i, response in enumerate(responses):
        if len(response) <= padding.DECODER_PREFIX:
            raise ValueError(f"responses[{i}] has {len(response)} tokens; an encoder-decoder model's response is the "
                             "decoder's sequence from its start token (as generate returns it), and TRL trains "
                             f"from its token {padding.DECODER_PREFIX} on: it needs at least "
                             f"{padding.DECODER_PREFIX + 1}")
    if rollout_logprobs is not None:
        raise ValueError("rollout_logprobs: not supported for encoder-decoder models")


def _group_message(row: int, first: int, group_size: int) -> str:
    return (f"queries[{row}] differs from queries[{first}]: with group_size={group_size} each {group_size} consecutive "
            f"rows are one group and share one query (pass each query {group_size} times, as "
            f"generate(..., num_return_sequences={group_size}) returns its responses)")


def _group_mismatch(queries: list, group_size: int) -> torch.Tensor:
    """Whether a row's query differs from its group's first (0-d bool, not read); lengths are compared here."""
    firsts = range(0, len(queries), group_size)
    for first in firsts:
        for row in range(first + 1, first + group_size):
            if len(queries[row]) != len(queries[first]):
                raise ValueError(_group_message(row, first, group_size))
    expected = torch.cat([queries[first] for first in firsts for _ in range(group_size)])
    return (torch.cat(queries) != expected).any()


def _check_groups(queries: list, group_size: int, known_bad: bool) -> None:
    if known_bad:
        for row, query in enumerate(queries):
            first = row - row % group_size
            if not torch.equal(query, queries[first]):
                raise ValueError(_group_message(row, first, group_size))


def check_step_inputs(queries, responses, scores, response_masks, batch_size: int, vocab_size: int,
                      device: torch.device, rollout_logprobs=None, max_length: Optional[int] = None,
                      rollout_correction: Optional[str] = None, encoder_decoder: bool = False,
                      group_size: int = 1, agree=read_verdicts) -> StepInputs:
    """All of `step`'s arguments, checked and moved to `device`; each query + response at most `max_length`
    (`encoder_decoder`: each query and each response, which must hold the decoder's start token and two more);
    `rollout_logprobs` required by a `rollout_correction`; with `group_size` > 1 each group of that many consecutive
    rows shares one query. The values (ids in the vocabulary, finite scores,
    0/1 masks, log-probs ≤ 0) are checked on the device and read back together by `agree` (with several
    processes, `agreement.decided_together`'s: every process's verdicts in one read), after which only a bad
    batch pays for the messages that name the culprit."""
    queries = check_token_list("queries", queries, device, batch_size)
    responses = check_token_list("responses", responses, device, batch_size)
    if encoder_decoder:
        _check_decoder_rows(queries, responses, max_length, rollout_logprobs)
    else:
        check_lengths("queries[{i}] + responses[{i}]", [len(q) + len(r) for q, r in zip(queries, responses)],
                      max_length)
    scores = _score_tensor(scores, batch_size, device)
    masks = check_response_masks(response_masks, responses, device)
    rollout_logprobs = check_rollout_logprobs(rollout_logprobs, responses, device)
    if rollout_correction is not None and rollout_logprobs is None:
        raise ValueError(f"rollout_logprobs: config.rollout_correction={rollout_correction!r} needs the rollout "
                         "engine's log-probs; pass those of generate(..., return_logprobs=True)")
    flags = [out_of_vocabulary(queries, vocab_size), out_of_vocabulary(responses, vocab_size),
             ~torch.isfinite(scores).all()]
    flags += [bad_response_masks(masks)] if masks is not None else []
    flags += [bad_rollout_logprobs(rollout_logprobs)] if rollout_logprobs is not None else []
    flags += [_group_mismatch(queries, group_size)] if group_size > 1 else []
    bad = agree(torch.stack(flags))  # the one read
    if group_size > 1:
        _check_groups(queries, group_size, bad.pop())
    _check_vocabulary([f"queries[{i}]" for i in range(len(queries))], queries, vocab_size, bad[0])
    _check_vocabulary([f"responses[{i}]" for i in range(len(responses))], responses, vocab_size, bad[1])
    _check_finite_scores(scores, bad[2])
    if masks is not None:
        _check_response_mask_values(masks, bad[3])
        masks = [mask.long() for mask in masks]
    if rollout_logprobs is not None:
        _check_rollout_logprob_values(rollout_logprobs, bad[-1])
    return StepInputs(queries, responses, scores, masks, rollout_logprobs)
