"""The step's padded batch: query + response rows padded on the tokenizer's side, and the response mask.

TRL 0.11 pads on `tokenizer.padding_side` and offsets each row's response positions by its
leading pads. Position t of a `[B, L-1]` grid stands for the prediction of token t+1, so a
response of n tokens after a query of m, behind p leading pads, covers positions
p+m-1 … p+m+n-2.

An encoder-decoder row is the decoder's sequence alone (the query goes to the encoder): TRL 0.11
trains on its positions 1 … n-2, i.e. the log-probs of tokens 2 … n-1. Its first `DECODER_PREFIX`
tokens (the decoder start token and the first sampled token) play the query's part above.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import host_index

SIDES = ("right", "left")
# TRL's mask of an encoder-decoder row starts at position 1: the first sampled token's log-prob is never trained
DECODER_PREFIX = 2


def row_parts(queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], encoder_decoder: bool,
              response_masks: Optional[Sequence[torch.Tensor]] = None) -> tuple:
    """`(lengths, prefixes, trained, response_masks)` of the rows a step pads: each row's tokens, the tokens before
    its trained part (the query; an encoder-decoder row's `DECODER_PREFIX`), the trained part's length, and the
    response masks cut to that part (each given per response token)."""
    if not encoder_decoder:
        return ([len(q) + len(r) for q, r in zip(queries, responses)], [len(q) for q in queries],
                [len(r) for r in responses], response_masks)
    lengths = [len(r) for r in responses]
    if response_masks is not None:
        response_masks = [m[DECODER_PREFIX:] for m in response_masks]
    return lengths, [DECODER_PREFIX] * len(lengths), [max(n - DECODER_PREFIX, 0) for n in lengths], response_masks


def padding_side(tokenizer) -> str:
    """The tokenizer's padding side, "right" or "left" (ValueError otherwise)."""
    side = getattr(tokenizer, "padding_side", "right")
    if side not in SIDES:
        raise ValueError(f"tokenizer.padding_side must be 'right' or 'left', got {side!r}")
    return side


def pad_rows(sequences: Sequence[torch.Tensor], width: int, pad_token_id: int, side: str,
             device: torch.device) -> tuple:
    """`input_ids` (pads = pad_token_id) and `attention_mask` `[B, width]`, int64, on `device`."""
    starts = row_starts([len(s) for s in sequences], width, side)
    input_ids = host_index.place([s.to(device) for s in sequences], starts, width, pad_token_id, torch.long, device)
    ones = [torch.ones(len(s), dtype=torch.long, device=device) for s in sequences]
    return input_ids, host_index.place(ones, starts, width, 0, torch.long, device)


def row_starts(lengths: Sequence[int], width: int, side: str) -> list:
    """Each row's first real column in a `[B, width]` batch padded on `side` (host arithmetic)."""
    return [width - n if side == "left" else 0 for n in lengths]


def widen(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int, pad_token_id: int, side: str) -> tuple:
    """The padded batch widened to `width` columns with more pads on `side` (as another process's widest row)."""
    extra = width - input_ids.shape[1]
    if extra <= 0:
        return input_ids, attention_mask
    sides = (extra, 0) if side == "left" else (0, extra)
    return (torch.nn.functional.pad(input_ids, sides, value=pad_token_id),
            torch.nn.functional.pad(attention_mask, sides, value=0))


def first_tokens(attention_mask: torch.Tensor) -> list:
    """Index of each row's first real token (its count of leading pads), as Python ints: a host read, for
    batches padded by someone else (a `training_data_collator`); the step's own padding knows its starts."""
    return attention_mask.long().argmax(1).tolist()


def response_mask(attention_mask: torch.Tensor, query_lengths: Sequence[int], response_lengths: Sequence[int],
                  response_masks: Optional[Sequence[torch.Tensor]] = None,
                  starts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The `[B, L-1]` int64 mask of response positions (times each row's 0/1 response mask if given).
    `starts`: each row's first real column, if known (else read from `attention_mask`)."""
    device = attention_mask.device
    if response_masks is None:
        response_masks = [torch.ones(n, dtype=torch.long, device=device) for n in response_lengths]
    return place_responses(attention_mask, query_lengths, response_masks, starts, dtype=torch.long)


def place_responses(attention_mask: torch.Tensor, query_lengths: Sequence[int], values: Sequence[torch.Tensor],
                    starts: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-response values at their positions of the `[B, L-1]` grid, 0 elsewhere (float32 unless `dtype`).
    `starts`: each row's first real column, if known (else read from `attention_mask`)."""
    if starts is None:
        starts = first_tokens(attention_mask)
    grid_starts = [first + query - 1 for first, query in zip(starts, query_lengths)]
    values = [v.to(attention_mask.device) for v in values]
    return host_index.place(values, grid_starts, attention_mask.shape[1] - 1, 0, dtype, attention_mask.device)
