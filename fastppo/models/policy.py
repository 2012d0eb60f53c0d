"""`CausalLMPolicy`: a plain transformers causal LM as the policy of critic-free training (no value head).

`PPOTrainer` wraps a causal LM it is given as it is (a `PreTrainedModel` or a PEFT model of one) in this
class when `PPOConfig.advantage_estimator` is critic-free. It has the value-head model's surface — the
LM and its head, PEFT, the reference copy, the trainer's forward paths — and no `v_head`: its forward
returns no values, and its state dict and checkpoints are the LM's alone, so the trained policy saves
as the model it was.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .value_head import AutoModelForCausalLMWithValueHead
from .wrapper import PreTrainedModelWrapper

__all__ = ["CausalLMPolicy", "wrap_plain_models"]


class CausalLMPolicy(AutoModelForCausalLMWithValueHead):
    """A transformers causal LM (`pretrained_model`) with the value-head model's surface and no value head."""

    supported_modules = ()  # nothing of its own is saved beside the LM's weights
    supported_args = ()

    def __init__(self, pretrained_model, **kwargs):
        if kwargs:
            raise TypeError(f"CausalLMPolicy takes no value-head arguments, got {sorted(kwargs)}")
        if not isinstance(pretrained_model, nn.Module) or not hasattr(pretrained_model, "get_output_embeddings"):
            raise TypeError(f"pretrained_model must be a transformers causal LM, got {type(pretrained_model).__name__}")
        PreTrainedModelWrapper.__init__(self, pretrained_model)  # (the value-head class's own init adds the head)
        if self.lm_head is None:
            raise ValueError("pretrained_model has no language-model head (get_output_embeddings() is None)")
        self.v_head = None

    def _values(self, hidden):
        return None  # no critic: forward's value is None

    def post_init(self, state_dict) -> None:
        """Nothing of its own to load."""

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The LM's state dict (none for PEFT models: PEFT saves the adapter)."""
        if getattr(self, "_module_key_layout", False):
            return nn.Module.state_dict(self, *args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out = destination if destination is not None else OrderedDict()
        if not self.is_peft_model:
            for key, value in self.pretrained_model.state_dict(keep_vars=keep_vars).items():
                out[prefix + key] = value
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if getattr(self, "_module_key_layout", False):
            return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)
        return self.pretrained_model.load_state_dict(state_dict, strict=strict and not self.is_peft_model,
                                                     assign=assign)


def wrap_plain_models(config, model, ref_model) -> tuple:
    """`(model, ref_model)` with a plain causal LM (not a fastppo wrapper) wrapped in `CausalLMPolicy`; ValueError
    when the config trains a critic, which needs the value head of `AutoModelForCausalLMWithValueHead`."""
    def plain(candidate) -> bool:
        return (isinstance(candidate, nn.Module) and not isinstance(candidate, PreTrainedModelWrapper)
                and hasattr(candidate, "get_output_embeddings") and hasattr(candidate, "config"))

    if not (plain(model) or plain(ref_model)):
        return model, ref_model
    critic = getattr(config, "uses_critic", True)
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    if critic or encoder_decoder:
        raise ValueError(f"model is a {type(model).__name__} without a value head: "
                         + ("advantage_estimator='gae' trains a critic and needs AutoModelForCausalLMWithValueHead"
                            if critic else "encoder-decoder policies need AutoModelForSeq2SeqLMWithValueHead")
                         + "; the critic-free estimators take a plain causal LM as it is")
    return (CausalLMPolicy(model) if plain(model) else model,
            CausalLMPolicy(ref_model) if plain(ref_model) else ref_model)
