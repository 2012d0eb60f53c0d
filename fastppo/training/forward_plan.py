"""The one seam between the step and the model's forward: which rows go through the model together,
packed or padded, and how their per-token results come back to the `[b, L-1]` grid.

`ForwardPlan` is built once from the config. The rollout asks it for `rollout_slices` (groups of
`rollout_batch_size` rows, or of at most `max_tokens_per_microbatch` tokens), the PPO epochs for
`micro_batches` of a mini-batch (with each one's share of the response tokens, the weight of its
loss in the mini-batch's gradient). For any group of rows, `prepare` builds the `Pass` the model
reads — the padded rows, or with `padding_free` one packed row (`fastppo.training.packing`) — and
`forward` runs it through the configured LM-head path (`fastppo.models.heads`) and hands back
log-probs, entropies and values on the grid, so nothing after it knows how the pass was made.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from accelerate.utils.memory import clear_device_cache

from .. import sharding
from ..models import heads
from . import microbatch, packing


class Pass(NamedTuple):
    """One forward pass of b rows as the model reads them: padded `[b, L]`, or packed into one row."""

    input_ids: torch.Tensor  # [b, L], or [1, N] packed: the N real tokens, sequence after sequence
    attention_mask: Optional[torch.Tensor]  # [b, L]; None packed (position ids restart per sequence)
    mask: torch.Tensor  # [b, L-1], or [1, N-1] packed: the response mask at the pass's positions
    packed: Optional[packing.Packed]  # how packed positions map to the grid (None: padded)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0] if self.packed is None else self.packed.grid.shape[0]

    def to_grid(self, values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-position values of this pass → the rows' `[b, L-1]` grid (zeros where no real token is
        predicted); differentiable. A padded pass is already on the grid."""
        return values if self.packed is None else packing.unpack(values, self.packed)


class ForwardPlan:
    """How a step's rows go through the model, from PPOConfig's `padding_free`, `max_tokens_per_microbatch`,
    `rollout_batch_size`/`mini_batch_size`, the LM-head path and the backend."""

    def __init__(self, config, accelerator, head_mode: str):
        self.accelerator = accelerator
        self.head_mode = head_mode
        self.backend = config.backend
        self.padding_free = config.padding_free
        self.token_budget = config.max_tokens_per_microbatch
        self.rollout_rows = config.rollout_batch_size or config.mini_batch_size
        self.optimize_device_cache = config.optimize_device_cache

    # ------------------------------------------------------------------ which rows together

    def rollout_slices(self, attention_mask: torch.Tensor) -> list:
        """Row slices of the rollout's forward passes: `rollout_batch_size` rows, or by token count."""
        if self.token_budget is None:
            return [slice(start, start + self.rollout_rows) for start in range(0, attention_mask.shape[0],
                                                                                self.rollout_rows)]
        return self._token_budget_slices(attention_mask)

    def micro_batches(self, attention_mask: torch.Tensor, mask: torch.Tensor) -> list:
        """A mini-batch's `(rows, weight)` passes: the whole mini-batch with weight 1, or token-budget slices
        weighted by their share of its response tokens. Every term of the PPO loss is a masked mean over
        those tokens, so the weighted sum of the slices' losses has the unsplit mini-batch's gradient."""
        slices = self._token_budget_slices(attention_mask) if self.token_budget is not None else []
        if len(slices) <= 1:
            return [(slice(0, attention_mask.shape[0]), 1.0)]
        total = mask.sum().float().clamp(min=1)
        return [(rows, mask[rows].sum().float() / total) for rows in slices]

    def _token_budget_slices(self, attention_mask: torch.Tensor) -> list:
        """Consecutive row slices of at most `max_tokens_per_microbatch` tokens each (a longer row alone).

        A slice's tokens are what it sends through the model: its real tokens when packed, rows ×
        width when padded. Every process makes as many slices as the process with most (splitting its
        largest ones), so forward and backward passes stay in step across processes.
        """
        if self.padding_free:
            costs = attention_mask.sum(1).tolist()
        else:
            costs = [attention_mask.shape[1]] * attention_mask.shape[0]
        slices = microbatch.token_budget_slices(costs, self.token_budget)
        if sharding.world_size(self.accelerator) > 1:
            count = torch.tensor([len(slices)], device=attention_mask.device)
            slices = microbatch.split_to_count(slices, int(self.accelerator.gather(count).max()))
        return slices

    # ------------------------------------------------------------------ one pass

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                pack: Optional[bool] = None) -> Pass:
        """The pass of these `[b, L]` rows (right-padded when packed) and their `[b, L-1]` response mask;
        `pack` overrides `padding_free` (TRL's `batched_forward_pass` takes rows padded on either side)."""
        if not (self.padding_free if pack is None else pack):
            return Pass(input_ids, attention_mask, mask, None)
        packed = packing.pack(input_ids, attention_mask, mask)
        return Pass(packed.input_ids, None, packed.mask, packed)

    def forward(self, model, batch: Pass, return_entropy: bool = False,
                keep_logits: bool = False) -> heads.TokenOutputs:
        """Run `model` (possibly accelerate-wrapped) on the pass: log-probs, entropies (if asked) and values
        on the rows' `[b, L-1]` grid; `logits` as the LM-head path computed them, at the pass's positions.
        `keep_logits`: the full `[b, L-1, V]` logits as TRL's model returns them, whatever the configured path."""
        kwargs = {} if batch.packed is None else {"position_ids": batch.packed.position_ids, "use_cache": False}
        out = heads.token_outputs(model, self.accelerator.unwrap_model(model), batch.input_ids, batch.attention_mask,
                                  batch.mask, "full" if keep_logits else self.head_mode, self.backend,
                                  return_entropy=return_entropy, keep_logits=keep_logits, **kwargs)
        return heads.TokenOutputs(batch.to_grid(out.logprobs), batch.to_grid(out.entropy), batch.to_grid(out.values),
                                  out.logits)

    def full_kl(self, batch: Pass, policy: heads.TokenOutputs, reference: heads.TokenOutputs) -> torch.Tensor:
        """The exact per-position KL of two outputs of this pass, on the grid `[b, L-1]`."""
        return batch.to_grid(heads.full_kl(policy, reference, batch.mask, self.backend))

    def release_cache(self) -> None:
        """TRL's `optimize_device_cache`: hand cached accelerator memory back after each pass."""
        if self.optimize_device_cache:
            clear_device_cache(garbage_collection=True)

    def check_models_pack(self, policy, reference, vocab_size: int) -> None:
        """With `padding_free`: refuse the policy or the reference (None: none) if its packed logits differ from its
        unpacked ones. Every process must call it: under ZeRO-3/FSDP a forward is collective."""
        if not self.padding_free:
            return
        unwrapped = self.accelerator.unwrap_model(policy)
        float32 = self.accelerator.mixed_precision == "no" and all(p.dtype == torch.float32
                                                                   for p in unwrapped.parameters())
        where = f"({type(unwrapped.causal_lm).__name__}, attention {unwrapped.config._attn_implementation})"
        for name, model in (("the policy", policy), ("the reference", reference)):
            if model is not None:
                packing.check_model_packs(model, vocab_size, self.accelerator.device, float32=float32,
                                          name=f"{name} {where}")
