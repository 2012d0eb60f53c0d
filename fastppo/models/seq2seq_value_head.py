"""An encoder-decoder LM (T5-, BART-style) with a scalar value head, checkpoint-compatible with TRL 0.11's.

`AutoModelForSeq2SeqLMWithValueHead` wraps a `transformers` seq2seq LM: the query goes to the
encoder, the response is the decoder's sequence (from its start token, as `generate` returns it),
and the value head reads the decoder's last hidden state. Its checkpoints are TRL's layout: the
base model's weights plus `v_head.summary.*`, so plain `AutoModelForSeq2SeqLM.from_pretrained(dir)`
loads the LM.

It is a subclass of the causal class because everything but the forward is the same (value head,
state-dict layout, loading and saving, the reference copy), so the trainer takes either; only
`is_encoder_decoder` tells them apart, as in TRL.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSeq2SeqLM

from .value_head import AutoModelForCausalLMWithValueHead

__all__ = ["AutoModelForSeq2SeqLMWithValueHead"]


class AutoModelForSeq2SeqLMWithValueHead(AutoModelForCausalLMWithValueHead):
    """A transformers encoder-decoder LM (`pretrained_model`) plus a value head (`v_head`) over the decoder.

    `forward(input_ids, attention_mask, decoder_input_ids=..., decoder_attention_mask=...)` returns
    `(lm_logits [B, Ld, V], loss, value [B, Ld])` as TRL's class does; `generate` delegates to the
    wrapped model. The reward adapter (`compute_reward_score`) is for causal LMs only, as in TRL.
    """

    transformers_parent_class = AutoModelForSeq2SeqLM
    lm_head_namings = ["lm_head", "embed_out", "output_projection"]  # TRL's
    is_encoder_decoder = True

    def __init__(self, pretrained_model, **kwargs):
        if kwargs.get("supports_rm_adapter"):
            raise ValueError("reward_adapter: the reward adapter scores with a causal LM's last hidden state; "
                             "encoder-decoder policies do not support it (nor does TRL)")
        config = getattr(pretrained_model, "config", None)
        if config is not None and not getattr(config, "is_encoder_decoder", False):
            raise TypeError(f"pretrained_model must be an encoder-decoder LM (config.is_encoder_decoder), got "
                            f"{type(pretrained_model).__name__}; use AutoModelForCausalLMWithValueHead for it")
        super().__init__(pretrained_model, **kwargs)

    def forward(self, *args, output: str = "logits", **kwargs):
        """Encoder `input_ids`/`attention_mask`, decoder inputs in `kwargs` (`decoder_input_ids`,
        `decoder_attention_mask`): `(lm_logits, loss, value)` over the decoder's positions, as the causal class's
        forward (`upcast_logits`, `return_values`, `return_past_key_values`); no `output="hidden"`."""
        if output != "logits":  # the hidden-state path feeds heads that assume logits = lm_head(hidden)
            raise ValueError(f"output must be 'logits' for an encoder-decoder model, got {output!r}")
        return super().forward(*args, **kwargs)

    def _final_hidden_state(self, output) -> torch.Tensor:
        return output.decoder_hidden_states[-1]

    def compute_reward_score(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        raise ValueError("compute_reward_score needs a causal LM with a reward adapter; encoder-decoder policies "
                         "do not support reward adapters (nor does TRL)")
