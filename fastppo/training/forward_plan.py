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

import logging
from typing import NamedTuple, Optional

import numpy as np
import torch
from accelerate.utils.memory import clear_device_cache

from .. import sharding
from ..models import attention_masks, heads, varlen_attention
from . import host_index, microbatch, packing

logger = logging.getLogger(__name__)


class Pass(NamedTuple):
    """One forward pass of b rows as the model reads them: padded `[b, L]`, or packed into one row."""

    input_ids: torch.Tensor  # [b, L], or [1, N] packed: the N real tokens, sequence after sequence
    attention_mask: Optional[torch.Tensor]  # [b, L]; None packed (position ids restart per sequence)
    mask: torch.Tensor  # [b, L-1], or [1, N-1] packed: the response mask at the pass's positions
    packed: Optional[packing.Packed]  # how packed positions map to the grid (None: padded)
    padded: Optional[bool] = None  # whether any row is shorter than L (None: not known on the host)
    response: Optional[tuple] = None  # (rows, columns) of the response positions in the pass (None: not known)
    encoder: Optional[tuple] = None  # encoder-decoder models: the encoder's (input_ids, attention_mask) [b, Lq]

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0] if self.packed is None else self.packed.grid[0]

    def to_grid(self, values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-position values of this pass → the rows' `[b, L-1]` grid (zeros where no real token is
        predicted); differentiable. A padded pass is already on the grid."""
        return values if self.packed is None else packing.unpack(values, self.packed)


def _response_positions(firsts, layout, width: int, device) -> tuple:
    """(rows, columns) long tensors of every response position of the pass, built on the host: row i's response
    predicts from column firsts[i] + query − 1 on (a packed pass is one row: `width` 0)."""
    counts = [n - q for n, q in zip(layout.lengths, layout.query_lengths)]
    flat = host_index.spans([f + q - 1 for f, q in zip(firsts, layout.query_lengths)], counts, width)
    both = host_index.to_device(np.stack([flat // width, flat % width]) if width else
                                np.stack([np.zeros_like(flat), flat]), device)
    return both[0], both[1]


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
        self.critic = config.uses_critic  # critic-free estimators never run the value head
        self.optimize_device_cache = config.optimize_device_cache
        self._mask_forms = {}  # id(unwrapped model) → the attention-mask forms it takes (attention_masks)
        self.packed_attention = {}  # "the policy"/"the reference" → the attention its packed passes run

    # ------------------------------------------------------------------ which rows together

    def rollout_slices(self, attention_mask: torch.Tensor, lengths: Optional[tuple] = None) -> list:
        """Row slices of the rollout's forward passes: `rollout_batch_size` rows, or by token count
        (`lengths`: the rows' real tokens if known on the host)."""
        if self.token_budget is None:
            return [slice(start, start + self.rollout_rows) for start in range(0, attention_mask.shape[0],
                                                                                self.rollout_rows)]
        return self._token_budget_slices(attention_mask, lengths)

    def micro_batches(self, attention_mask: torch.Tensor, mask: torch.Tensor, layout=None) -> list:
        """A mini-batch's `(rows, weight)` passes: the whole mini-batch with weight 1, or token-budget slices
        weighted by their share of its response tokens. Every term of the PPO loss is a masked mean over
        those tokens, so the weighted sum of the slices' losses has the unsplit mini-batch's gradient."""
        lengths = None if layout is None else layout.lengths
        slices = self._token_budget_slices(attention_mask, lengths) if self.token_budget is not None else []
        if len(slices) <= 1:
            return [(slice(0, attention_mask.shape[0]), 1.0)]
        total = mask.sum().float().clamp(min=1)
        return [(rows, mask[rows].sum().float() / total) for rows in slices]

    def _token_budget_slices(self, attention_mask: torch.Tensor, lengths: Optional[tuple]) -> list:
        """Consecutive row slices of at most `max_tokens_per_microbatch` tokens each (a longer row alone).

        A slice's tokens are what it sends through the model: its real tokens when packed, rows ×
        width when padded. Every process makes as many slices as the process with most (splitting its
        largest ones), so forward and backward passes stay in step across processes.
        """
        if self.padding_free:
            costs = list(lengths) if lengths is not None else attention_mask.sum(1).tolist()
        else:
            costs = [attention_mask.shape[1]] * attention_mask.shape[0]
        slices = microbatch.token_budget_slices(costs, self.token_budget)
        if sharding.world_size(self.accelerator) > 1:
            count = torch.tensor([len(slices)], device=attention_mask.device)
            slices = microbatch.split_to_count(slices, int(self.accelerator.gather(count).max()))
        return slices

    # ------------------------------------------------------------------ one pass

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                pack: Optional[bool] = None, layout=None, encoder: Optional[tuple] = None) -> Pass:
        """The pass of these `[b, L]` rows (right-padded when packed) and their `[b, L-1]` response mask;
        `pack` overrides `padding_free` (TRL's `batched_forward_pass` takes rows padded on either side).
        `layout`: the rows' `RowLayout`, if the host knows it (then nothing is read back to build the pass, and
        the response-only head paths gather their positions by a host-built index). `encoder`: an
        encoder-decoder model's encoder rows `(input_ids, attention_mask)`; the rows above are then the
        decoder's (always padded, full logits: the trainer refuses the other paths for such models)."""
        width = input_ids.shape[1]
        if encoder is not None:
            return Pass(input_ids, attention_mask, mask, None, encoder=encoder)
        if not (self.padding_free if pack is None else pack):
            padded = None if layout is None else any(n < width for n in layout.lengths)
            response = None if layout is None or self.head_mode == "full" else _response_positions(
                layout.starts, layout, width - 1, input_ids.device)
            return Pass(input_ids, attention_mask, mask, None, padded, response)
        packed = packing.pack(input_ids, attention_mask, mask, None if layout is None else layout.lengths)
        response = None
        if layout is not None and self.head_mode != "full":  # in the packed row: each sequence from its offset
            offsets = np.cumsum(layout.lengths) - np.asarray(layout.lengths)
            response = _response_positions(offsets, layout, 0, input_ids.device)
        return Pass(packed.input_ids, None, packed.mask, packed, response=response)

    def forward(self, model, batch: Pass, return_entropy: bool = False,
                keep_logits: bool = False) -> heads.TokenOutputs:
        """Run `model` (possibly accelerate-wrapped) on the pass: log-probs, entropies (if asked) and values
        (zeros without a critic: its value head is not run) on the rows' `[b, L-1]` grid; `logits` as the LM-head path computed them, at the pass's positions.
        `keep_logits`: the full `[b, L-1, V]` logits as TRL's model returns them, whatever the configured path."""
        unwrapped = sharding.unwrap(self.accelerator, model)
        if batch.encoder is not None:  # the model's own masks: the forms below are probed on causal LMs
            kwargs = {"use_cache": False, "attention_mask": batch.encoder[1],
                      "decoder_attention_mask": batch.attention_mask, "encoder_input_ids": batch.encoder[0]}
        elif batch.packed is None:  # no cache: transformers would build one on each pass for nothing
            kwargs = {"use_cache": False, **attention_masks.mask_kwargs(
                self._mask_form(model, unwrapped), unwrapped.causal_lm, batch.attention_mask, batch.padded)}
        else:
            kwargs = packing.call_kwargs(batch.packed, unwrapped.causal_lm)
        out = heads.token_outputs(model, unwrapped, batch.input_ids, batch.mask,
                                  "full" if keep_logits else self.head_mode, self.backend,
                                  return_entropy=return_entropy, keep_logits=keep_logits,
                                  response_positions=batch.response, return_values=self.critic, **kwargs)
        logprobs = batch.to_grid(out.logprobs)
        values = batch.to_grid(out.values) if out.values is not None else torch.zeros_like(logprobs)  # no critic
        return heads.TokenOutputs(logprobs, batch.to_grid(out.entropy), values, out.logits)

    def full_kl(self, batch: Pass, policy: heads.TokenOutputs, reference: heads.TokenOutputs) -> torch.Tensor:
        """The exact per-position KL of two outputs of this pass, on the grid `[b, L-1]`."""
        return batch.to_grid(heads.full_kl(policy, reference, batch.mask, self.backend, batch.response))

    def release_cache(self) -> None:
        """TRL's `optimize_device_cache`: hand cached accelerator memory back after each pass."""
        if self.optimize_device_cache:
            clear_device_cache(garbage_collection=True)

    def _mask_form(self, model, unwrapped) -> attention_masks.MaskForm:
        """The attention-mask forms `model` takes (see `fastppo.models.attention_masks`), found at its first pass:
        every process makes the same passes, so the probe's forwards (collective under ZeRO-3/FSDP) match."""
        form = self._mask_forms.get(id(unwrapped))
        if form is None:
            form = self._mask_forms[id(unwrapped)] = attention_masks.choose_form(
                model, unwrapped, sharding.vocab_size(unwrapped.lm_head.weight), self.accelerator.device,
                float32=self._float32(model))
        return form

    def _float32(self, model) -> bool:
        """Whether `model` computes in float32 (no bf16/fp16 weights, no mixed precision): sets tolerances."""
        return self.accelerator.mixed_precision == "no" and all(
            p.dtype == torch.float32 for p in sharding.unwrap(self.accelerator, model).parameters())

    def install_attention(self, policy, reference) -> None:
        """Switch the policy and the reference (None: none) from SDPA to `fastppo.models.varlen_attention`'s
        implementation (SDPA itself for every call but unpadded and packed passes, which it runs without a mask
        and without a host read); what packed passes will run is kept in `packed_attention`."""
        for name, model in (("the policy", policy), ("the reference", reference)):
            unwrapped = None if model is None else sharding.unwrap(self.accelerator, model)
            if unwrapped is not None and not getattr(unwrapped, "is_encoder_decoder", False):  # (enc-dec passes are
                # padded, with the model's own masks); the kernel packed passes will use, or what was kept:
                self.packed_attention[name] = varlen_attention.install(unwrapped.causal_lm)

    def check_models_pack(self, policy, reference, vocab_size: int) -> None:
        """With `padding_free`: refuse the policy or the reference (None: none) if its packed logits differ from its
        unpacked ones, and log the attention packed passes run. Every process must call it: under ZeRO-3/FSDP a
        forward is collective."""
        if not self.padding_free:
            return
        float32 = self._float32(policy)
        for name, model in (("the policy", policy), ("the reference", reference)):
            if model is None:
                continue
            unwrapped = sharding.unwrap(self.accelerator, model)
            lm = unwrapped.causal_lm
            where = f"({type(lm).__name__}, attention {lm.config._attn_implementation})"
            packing.check_model_packs(model, unwrapped, vocab_size, self.accelerator.device,
                                      float32=float32, name=f"{name} {where}")
        logger.info("padding_free: packed passes use %s", ", ".join(f"{kernel} ({name})" for name, kernel
                                                                  in self.packed_attention.items()))
