"""What one `step` learns from: the padded batch, the rollout's no-grad outputs, and the experience record.

Position t of every `[B, L-1]` grid stands for the prediction of token t+1 of the `[B, L]` rows
(see `fastppo.training.padding`). The phases hand these records to one another instead of
positional tuples: `PaddedBatch` → rollout forward → `Rollout` → rewards and advantages →
`Experience` → PPO epochs, which train on `Experience.select(rows)` mini-batches.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from . import host_index


class RowLayout(NamedTuple):
    """Where each row's tokens are, known on the host: first real column, real tokens, and the tokens before the
    response (the query's; an encoder-decoder row's untrained decoder prefix, `padding.DECODER_PREFIX`)."""

    starts: tuple
    lengths: tuple
    query_lengths: tuple

    def select(self, rows) -> "RowLayout":
        """The layout of some rows: a slice, or host row indices."""
        if isinstance(rows, slice):
            return RowLayout(*(field[rows] for field in self))
        return RowLayout(*(tuple(field[i] for i in rows) for field in self))


class PaddedBatch(NamedTuple):
    """The step's query + response rows as the model reads them (an encoder-decoder model: the responses as the
    decoder's rows, the queries as the encoder's)."""

    input_ids: torch.Tensor  # [B, L] int64, pads = the tokenizer's pad token
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    mask: torch.Tensor  # [B, L-1] int64: 1 where position t predicts a trained response token
    layout: Optional[RowLayout] = None  # None: padded by a user's collator, so not known on the host
    encoder_input_ids: Optional[torch.Tensor] = None  # [B, Lq]: the encoder's rows (None: a causal LM)
    encoder_attention_mask: Optional[torch.Tensor] = None

    def encoder(self, rows=slice(None)) -> Optional[tuple]:
        """`(input_ids, attention_mask)` of the encoder's `rows`, or None for a causal LM."""
        return None if self.encoder_input_ids is None else (self.encoder_input_ids[rows],
                                                             self.encoder_attention_mask[rows])


class Rollout(NamedTuple):
    """What the no-grad forward passes over the whole batch produce; all `[B, L-1]`."""

    logprobs: torch.Tensor  # float32: the policy's log-prob of token t+1 at position t
    ref_logprobs: torch.Tensor  # float32: the reference's
    values: torch.Tensor  # float32: the value head's
    full_kl: Optional[torch.Tensor]  # float32 exact KL per position, for kl_penalty="full" (else None)


@dataclasses.dataclass(frozen=True)
class Experience:
    """The per-token tensors the PPO epochs train on, for B rows.

    `input_ids`, `attention_mask` `[B, L]` are the rows the training forward reads again (with the
    `encoder_*` rows for an encoder-decoder model); the rest
    are `[B, L-1]` on the same grid, float32 but `mask`. Old log-probs and values come from the
    rollout; `old_values` are masked (0 off the response), as TRL's. `rollout_logprobs` are the
    rollout engine's own log-probs, set only for `rollout_correction="tis"`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    rollout_logprobs: Optional[torch.Tensor] = None
    layout: Optional[RowLayout] = None  # where each row's tokens are, on the host (None: unknown)
    ref_logprobs: Optional[torch.Tensor] = None  # the reference's, for a KL loss (PPOConfig.kl_loss_coef > 0)
    encoder_input_ids: Optional[torch.Tensor] = None  # [B, Lq], encoder-decoder models only
    encoder_attention_mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def encoder(self) -> Optional[tuple]:
        """`(input_ids, attention_mask)` of the encoder's rows, or None for a causal LM."""
        return None if self.encoder_input_ids is None else (self.encoder_input_ids, self.encoder_attention_mask)

    def select(self, rows: Union[slice, np.ndarray]) -> "Experience":
        """The same record for some rows: a slice, or host row indices (a shuffled mini-batch), which go to
        the device once for all the fields."""
        index = rows if isinstance(rows, slice) else host_index.to_device(np.asarray(rows, np.int64),
                                                                          self.input_ids.device)
        selected = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "layout":
                selected[field.name] = None if value is None else value.select(rows)
            else:
                selected[field.name] = None if value is None else value[index]
        return Experience(**selected)
