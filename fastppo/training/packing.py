"""Padding-free forward passes: a right-padded batch packed into one row, results put back.

`pack` turns `input_ids`/`attention_mask` `[b, L]` (right-padded, as `PPOTrainer._pad_batch`
builds them) into one row of the N real tokens with position ids restarting at 0 for each
sequence. transformers then keeps attention inside each sequence: from position ids that
restart (flash-attention's varlen path), or, on SDPA/eager, by building a block-diagonal mask
from them when no attention mask and no cache are passed (transformers 5 `masking_utils`). No
pad token reaches the model or the LM head.

Only the model's forward is packed. Its per-token results (log-probs, entropies, values: one
float each) go back to the `[b, L-1]` grid with `unpack`, so rewards, GAE, whitening and the
PPO loss run exactly as on padded batches: `[b, L-1]` floats cost nothing next to the `[N, V]`
logits that packing saves, and no kernel needs sequence boundaries.

Position t of a packed row predicts token t+1; at the last token of each sequence that is
the next sequence's first token, a position no mask ever selects (a sequence of n tokens
predicts at its positions 0 … n-2 only).

`check_model_packs` proves, on the model itself, that packing changes nothing: it runs two
short sequences packed and apart and refuses the model if the logits differ.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Packed(NamedTuple):
    input_ids: torch.Tensor  # [1, N] the batch's real tokens, sequence after sequence
    position_ids: torch.Tensor  # [1, N] 0 … n-1 within each sequence
    mask: torch.Tensor  # [1, N-1] the grid's response mask at the packed positions
    grid: torch.Tensor  # [b, L-1] bool: grid positions that predict a real token (t ≤ n-2)
    index: torch.Tensor  # [grid.sum()] long: their packed positions, in the grid's row-major order


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor) -> Packed:
    """Pack a right-padded `[b, L]` batch (and its `[b, L-1]` response mask) into one row."""
    lengths = attention_mask.sum(1)
    offsets = torch.cumsum(lengths, 0) - lengths
    tokens = input_ids[attention_mask.bool()]  # row-major: each row's tokens in order, rows in order
    n_tokens = tokens.numel()
    positions = torch.arange(n_tokens, device=input_ids.device) - torch.repeat_interleave(offsets, lengths)
    t = torch.arange(mask.shape[1], device=input_ids.device)
    grid = t[None, :] < (lengths - 1)[:, None]
    index = (offsets[:, None] + t[None, :])[grid]
    packed_mask = mask.new_zeros(max(n_tokens - 1, 0))
    packed_mask[index] = mask[grid]
    return Packed(tokens[None], positions[None], packed_mask[None], grid, index)


def unpack(values: Optional[torch.Tensor], packed: Packed) -> Optional[torch.Tensor]:
    """`[1, N-1]` per-position values → the `[b, L-1]` grid, zeros where no real token is predicted
    (differentiable: the training forward's log-probs and values flow back through it)."""
    if values is None:
        return None
    out = values.new_zeros(packed.grid.shape)
    return out.masked_scatter(packed.grid, values[0, packed.index])


@torch.no_grad()
def check_model_packs(model, vocab_size: int, device: torch.device, name: str = "this model",
                      float32: bool = True) -> None:
    """Raise ValueError unless `model` gives two packed sequences the logits it gives them apart.

    `model` is the (possibly accelerate-wrapped) value-head model; every process must call it
    (under ZeRO-3/FSDP a forward is collective). `float32`: whether the model computes in float32
    (not bf16/fp16 weights or mixed precision), which sets the tolerance: a leak across sequences
    moves logits by far more than either.
    """
    first = torch.tensor([[3, 5, 7, 11, 13]], device=device) % vocab_size
    second = torch.tensor([[17, 19, 23]], device=device) % vocab_size
    was_training = model.training
    model.eval()
    try:
        apart = [model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)[0] for ids in (first, second)]
        ids = torch.cat([first, second], dim=1)
        positions = torch.cat([torch.arange(first.shape[1]), torch.arange(second.shape[1])]).to(device)[None]
        together = model(input_ids=ids, attention_mask=None, position_ids=positions, use_cache=False)[0]
    finally:
        model.train(was_training)
    expected = torch.cat(apart, dim=1).float()
    gap = float((together.float() - expected).abs().max())
    scale = 1.0 + float(expected.abs().max())
    tolerance = (1e-4 if float32 else 3e-2) * scale
    if not gap <= tolerance:
        raise ValueError(f"padding_free: {name} attends across packed sequences (logits differ by {gap:.3g} "
                         "packed vs apart); set padding_free=False")
