"""The value-head model's public import path (`from fastppo.model import ...`, as `trl.models` in TRL).

The implementation lives in `fastppo.models.value_head`.
"""

from .models.value_head import (AutoModelForCausalLMWithValueHead, PreTrainedModelWrapper, ValueHead,
                                create_reference_model, disable_dropout)

__all__ = ["AutoModelForCausalLMWithValueHead", "PreTrainedModelWrapper", "ValueHead", "create_reference_model",
           "disable_dropout"]
