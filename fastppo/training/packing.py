"""Padding-free forward passes: a right-padded batch packed into one row, results put back.

`pack` turns `input_ids`/`attention_mask` `[b, L]` (right-padded, as `PPOTrainer._pad_batch`
builds them) into one row of the N real tokens with position ids restarting at 0 for each
sequence. Attention stays inside each sequence: an SDPA model runs varlen attention
(`fastppo.models.varlen_attention`: flash-attn's or torch's varlen kernel on a GPU, SDPA per
sequence on the CPU; no `[N, N]` mask, no host read); any other model is left to transformers,
which builds a block-diagonal mask from position ids that restart when no attention mask and no
cache are passed (transformers 5 `masking_utils`). No pad token reaches the model or the LM head.
Transformers without that machinery (4.46) attend across the sequences of a packed row, so there
`check_model_packs` refuses `padding_free` with the reason.

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

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..models import varlen_attention
from . import host_index


class Packed(NamedTuple):
    input_ids: torch.Tensor  # [1, N] the batch's real tokens, sequence after sequence
    position_ids: torch.Tensor  # [1, N] 0 … n-1 within each sequence
    mask: torch.Tensor  # [1, N-1] the grid's response mask at the packed positions
    grid: torch.Size  # [b, L-1]: the rows' grid
    grid_index: torch.Tensor  # [M] long: the grid positions (row-major, flat) that predict a real token (t ≤ n-2)
    index: torch.Tensor  # [M] long: their packed positions
    lengths: tuple  # the sequences' lengths n (host ints), in order
    cu_seq_lens: torch.Tensor  # [b+1] long: where each sequence starts in the row, then N (varlen attention)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
         lengths: Optional[Sequence[int]] = None) -> Packed:
    """Pack a right-padded `[b, L]` batch (and its `[b, L-1]` response mask) into one row. `lengths`: the rows'
    real tokens if the host knows them (else read from `attention_mask`, one host read); every index is then
    built on the host and copied once (`fastppo.training.host_index`)."""
    lengths = tuple(attention_mask.sum(1).tolist() if lengths is None else lengths)
    rows, width = input_ids.shape
    predicting = [max(n - 1, 0) for n in lengths]  # a sequence of n tokens predicts at positions 0 … n-2
    n_tokens, n_predicting = sum(lengths), sum(predicting)
    offsets = np.cumsum(lengths) - np.asarray(lengths)
    host = np.concatenate([
        host_index.spans([0] * rows, lengths, width),  # where the real tokens are in [b, L]
        np.arange(n_tokens) - np.repeat(offsets, lengths),  # position ids
        host_index.spans([0] * rows, predicting, width - 1),  # grid positions predicting a real token
        host_index.spans(offsets, predicting, 0),  # their packed positions (one row: width 0)
        np.append(offsets, n_tokens),  # cumulative lengths
    ]).astype(np.int64)
    token_index, positions, grid_index, index, cu_seq_lens = host_index.to_device(host, input_ids.device).split(
        [n_tokens, n_tokens, n_predicting, n_predicting, rows + 1])
    packed_mask = mask.new_zeros(max(n_tokens - 1, 0))
    packed_mask[index] = mask.reshape(-1)[grid_index]
    return Packed(input_ids.reshape(-1)[token_index][None], positions[None], packed_mask[None],
                  torch.Size((rows, width - 1)), grid_index, index, lengths, cu_seq_lens)


def unpack(values: Optional[torch.Tensor], packed: Packed) -> Optional[torch.Tensor]:
    """`[1, N-1]` per-position values → the `[b, L-1]` grid, zeros where no real token is predicted
    (differentiable: the training forward's log-probs and values flow back through it)."""
    if values is None:
        return None
    out = values.new_zeros(packed.grid.numel())
    return out.index_put((packed.grid_index,), values[0, packed.index]).view(packed.grid)


def call_kwargs(packed: Packed, causal_lm) -> dict:
    """The model-call kwargs of a packed pass: varlen attention where `varlen_attention.install` switched the model
    to it, else transformers' own handling of position ids that restart (a block-diagonal mask on SDPA/eager). No cache:
    with one, transformers would attend across the sequences."""
    if causal_lm.config._attn_implementation == varlen_attention.NAME:
        return {"use_cache": False, **varlen_attention.call_kwargs(packed.position_ids, packed.cu_seq_lens,
                                                                   packed.lengths)}
    return {"use_cache": False, "attention_mask": None, "position_ids": packed.position_ids}


@torch.no_grad()
def check_model_packs(model, unwrapped, vocab_size: int, device: torch.device, name: str = "this model",
                      float32: bool = True) -> None:
    """Raise ValueError unless `model` gives two packed sequences the logits it gives them apart.

    `model` is the (possibly accelerate-wrapped) value-head model, `unwrapped` the bare one; every
    process must call it (under ZeRO-3/FSDP a forward is collective). The packed pass is made as the
    trainer makes its own (`pack`, `call_kwargs`). `float32`: whether the model computes in float32 (not
    bf16/fp16 weights or mixed precision), which sets the tolerance: a leak across sequences moves logits by
    far more than either.
    """
    first = torch.tensor([[3, 5, 7, 11, 13]], device=device) % vocab_size
    second = torch.tensor([[17, 19, 23]], device=device) % vocab_size
    rows = torch.cat([first, torch.nn.functional.pad(second, (0, 2))])
    attention_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], device=device)
    packed = pack(rows, attention_mask, torch.zeros_like(rows[:, 1:]), lengths=(5, 3))
    was_training = unwrapped.training  # not the wrapper's: a DeepSpeed engine's does not follow train()/eval()
    unwrapped.eval()
    try:
        apart = [model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, return_values=False)[0]
                 for ids in (first, second)]
        together = model(input_ids=packed.input_ids, return_values=False, **call_kwargs(packed, unwrapped.causal_lm))[0]
    finally:
        unwrapped.train(was_training)
    expected = torch.cat(apart, dim=1).float()
    gap = float((together.float() - expected).abs().max())
    scale = 1.0 + float(expected.abs().max())
    tolerance = (1e-4 if float32 else 3e-2) * scale
    if not gap <= tolerance:
        why = "" if varlen_attention.AVAILABLE else (
            f"; packed passes need transformers' attention registry: {varlen_attention.UNAVAILABLE}")
        raise ValueError(f"padding_free: {name} attends across packed sequences (logits differ by {gap:.3g} "
                         f"packed vs apart{why}); set padding_free=False")
