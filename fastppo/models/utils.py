"""`trl.models.utils`' public names: the ChatML set-up, the supported architectures, and the
context that hands out a model ready to generate from."""

from __future__ import annotations

import contextlib
from typing import Optional

from .. import sharding
from .seq2seq_value_head import AutoModelForSeq2SeqLMWithValueHead
from .value_head import AutoModelForCausalLMWithValueHead

SUPPORTED_ARCHITECTURES = (AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead)  # as TRL's

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
# Each message as "<|im_start|>{role}\n{content}<|im_end|>\n"; a generation prompt opens the assistant's turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + CHATML_START + "' + message['role'] + '\n' + message['content'] + '" + CHATML_END + "' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + CHATML_START + "assistant\n' }}{% endif %}"
)


def setup_chat_format(model, tokenizer, format: Optional[str] = "chatml", resize_to_multiple_of: Optional[int] = None):
    """Give `tokenizer` ChatML's special tokens and template and grow `model`'s embeddings to match.

    `<|im_start|>` becomes the BOS token, `<|im_end|>` the EOS and pad token (the model's config and
    generation config follow); the embedding matrix is resized to the tokenizer's length, rounded up to
    `resize_to_multiple_of` when given. Returns `(model, tokenizer)`, both changed in place.
    """
    if format != "chatml":
        raise ValueError(f"format must be 'chatml' (the only chat format TRL 0.11 sets up), got {format!r}")
    tokenizer.add_special_tokens({"additional_special_tokens": [CHATML_START, CHATML_END]})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = CHATML_START, CHATML_END, CHATML_END
    tokenizer.chat_template = CHATML_TEMPLATE
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=resize_to_multiple_of)
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if config is not None:
            config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextlib.contextmanager
def unwrap_model_for_generation(model, accelerator, is_peft_model: bool = False):
    """The bare model with whole weights for the duration (ZeRO-3/FSDP2 shards gathered), to call
    `generate` on. `is_peft_model` is accepted for TRL's signature; adapters stay as they are."""
    with sharding.gathered(accelerator, model):
        yield accelerator.unwrap_model(model)
