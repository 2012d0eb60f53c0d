"""The value-head model's public import path (`from fastppo.model import ...`, as `trl.models` in TRL).

The implementations live in `fastppo.models.value_head` and `fastppo.models.seq2seq_value_head`.
"""

from .models.value_head import (AutoModelForCausalLMWithValueHead, PreTrainedModelWrapper, ValueHead,
                                create_reference_model, disable_dropout)
from .models.seq2seq_value_head import AutoModelForSeq2SeqLMWithValueHead

__all__ = ["AutoModelForCausalLMWithValueHead", "AutoModelForSeq2SeqLMWithValueHead", "PreTrainedModelWrapper",
           "ValueHead", "create_reference_model", "disable_dropout"]
