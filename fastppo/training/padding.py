"""The step's padded batch: query + response rows padded on the tokenizer's side, and the response mask.

TRL 0.11 pads on `tokenizer.padding_side` and offsets each row's response positions by its
leading pads. Position t of a `[B, L-1]` grid stands for the prediction of token t+1, so a
response of n tokens after a query of m, behind p leading pads, covers positions
p+m-1 … p+m+n-2.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

SIDES = ("right", "left")


def padding_side(tokenizer) -> str:
    """The tokenizer's padding side, "right" or "left" (ValueError otherwise)."""
    side = getattr(tokenizer, "padding_side", "right")
    if side not in SIDES:
        raise ValueError(f"tokenizer.padding_side must be 'right' or 'left', got {side!r}")
    return side


def pad_rows(sequences: Sequence[torch.Tensor], width: int, pad_token_id: int, side: str,
             device: torch.device) -> tuple:
    """`input_ids` (pads = pad_token_id) and `attention_mask` `[B, width]`, int64, on `device`."""
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
        input_ids[row, columns] = sequence
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


def widen(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int, pad_token_id: int, side: str) -> tuple:
    """The padded batch widened to `width` columns with more pads on `side` (as another process's widest row)."""
    extra = width - input_ids.shape[1]
    if extra <= 0:
        return input_ids, attention_mask
    sides = (extra, 0) if side == "left" else (0, extra)
    return (torch.nn.functional.pad(input_ids, sides, value=pad_token_id),
            torch.nn.functional.pad(attention_mask, sides, value=0))


def first_tokens(attention_mask: torch.Tensor) -> list:
    """Index of each row's first real token (its count of leading pads), as Python ints."""
    return attention_mask.long().argmax(1).tolist()


def response_mask(attention_mask: torch.Tensor, query_lengths: Sequence[int], response_lengths: Sequence[int],
                  response_masks: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """The `[B, L-1]` int64 mask of response positions (times each row's 0/1 response mask if given)."""
    batch_size, width = attention_mask.shape
    mask = torch.zeros((batch_size, width - 1), dtype=torch.long, device=attention_mask.device)
    for row, first in enumerate(first_tokens(attention_mask)):
        start = first + query_lengths[row] - 1
        mask[row, start: start + response_lengths[row]] = 1 if response_masks is None else response_masks[row]
    return mask


def place_responses(attention_mask: torch.Tensor, query_lengths: Sequence[int], values: Sequence[torch.Tensor],
                    ) -> torch.Tensor:
    """Per-response float values at their positions of the `[B, L-1]` grid, 0 elsewhere (float32)."""
    batch_size, width = attention_mask.shape
    out = torch.zeros((batch_size, width - 1), dtype=torch.float32, device=attention_mask.device)
    for row, first in enumerate(first_tokens(attention_mask)):
        start = first + query_lengths[row] - 1
        out[row, start: start + len(values[row])] = values[row]
    return out
