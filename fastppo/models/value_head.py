"""A causal LM with a scalar value head, checkpoint-compatible with TRL 0.11's.

`AutoModelForCausalLMWithValueHead` wraps any `transformers` causal LM
(`pretrained_model`) and adds `v_head`, a dropout + `Linear(hidden, 1)` over the last
hidden state. Its checkpoints are the base model's plus `v_head.summary.weight` and
`v_head.summary.bias`, exactly TRL's layout: a TRL checkpoint loads here, ours loads in TRL,
and plain `AutoModelForCausalLM.from_pretrained(dir)` loads the LM. Loading, saving and the
reward adapter live in the base class, `PreTrainedModelWrapper` (wrapper.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from . import varlen_attention
from .checkpoint_files import V_HEAD_PREFIX
from .wrapper import PreTrainedModelWrapper, drop_unused_tokenizer_outputs

__all__ = ["AutoModelForCausalLMWithValueHead", "PreTrainedModelWrapper", "ValueHead", "create_reference_model"]


# Config attributes of models whose logits are not just `lm_head(hidden)`.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# Keyword arguments of the trainer's forward passes that the causal LM hands to its backbone unchanged.
_BACKBONE_KWARGS = frozenset({"use_cache", "position_ids", "token_type_ids", "cache_position", "cu_seq_lens_q",
                              "cu_seq_lens_k", "max_length_q", "max_length_k", varlen_attention.SEQ_LENS,
                              varlen_attention.CAUSAL})


def logits_are_lm_head(config) -> bool:
    """Whether a causal LM with this config computes its logits as `lm_head(last_hidden_state)` and nothing more."""
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)


def _hidden_size(config) -> int:
    for name in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):
        size = getattr(config, name, None)
        if isinstance(size, int):
            return size
    text_config = getattr(config, "text_config", None)
    if text_config is not None:
        return _hidden_size(text_config)
    raise ValueError(f"cannot find the hidden size in the model config {type(config).__name__}")


# value-head arguments that take a number (or None: the default): (check, what the message says is expected)
_VALUE_HEAD_NUMBERS = {
    "summary_dropout_prob": (lambda v: 0 <= v < 1, "a number in [0, 1) or None"),
    "v_head_initializer_range": (lambda v: v > 0, "a positive number or None"),
}


def _check_value_head_number(name: str, value, label: Optional[str] = None) -> None:
    """TypeError for a non-number, ValueError for NaN/inf or out of range; the message names `label` or `name`."""
    if value is None:
        return
    check, expected = _VALUE_HEAD_NUMBERS[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{label or name} must be {expected}, got {value!r}")
    if not (math.isfinite(value) and check(value)):
        raise ValueError(f"{label or name} must be {expected}, got {value!r}")


class ValueHead(nn.Module):
    """Dropout + Linear(hidden, 1): one value per position. Computes in its own dtype (float32 by default).

    `config`: the hidden size, or a transformers config (as TRL's `ValueHead(config)`). The dropout
    probability is `summary_dropout_prob` if given, else the config's `summary_dropout_prob`, else 0.1
    (TRL lets the config's value win over the argument).
    """

    def __init__(self, config, **kwargs):
        super().__init__()
        hidden_size = config if isinstance(config, int) else _hidden_size(config)
        if "summary_dropout_prob" in kwargs:
            dropout = kwargs["summary_dropout_prob"]
            _check_value_head_number("summary_dropout_prob", dropout)
        else:
            dropout = getattr(config, "summary_dropout_prob", 0.1)
            _check_value_head_number("summary_dropout_prob", dropout, "the model config's summary_dropout_prob")
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states `[B, T, H]` → values `[B, T, 1]` in the head's dtype."""
        hidden_states = self.dropout(hidden_states)
        if hidden_states.dtype != self.summary.weight.dtype:
            hidden_states = hidden_states.to(self.summary.weight.dtype)
        return self.summary(hidden_states)


class AutoModelForCausalLMWithValueHead(PreTrainedModelWrapper):
    """A transformers causal LM (`pretrained_model`) plus a value head (`v_head`).

    `forward` returns `(lm_logits, loss, value)` as TRL's class does; `generate`
    delegates to the wrapped model. `from_pretrained`, `save_pretrained`, `push_to_hub` and
    `compute_reward_score` are `PreTrainedModelWrapper`'s.
    """

    transformers_parent_class = AutoModelForCausalLM
    lm_head_namings = ["lm_head", "embed_out"]  # TRL's; the head is found by get_output_embeddings() first
    supported_args = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")

    def __init__(self, pretrained_model: PreTrainedModel, **kwargs):
        adapter_kwargs = {k: kwargs.pop(k) for k in ("score_module", "supports_rm_adapter", "rm_adapter_name")
                          if k in kwargs}
        unknown = set(kwargs) - set(self.supported_args)
        if unknown:
            raise TypeError(f"unexpected value-head arguments {sorted(unknown)}; supported: {self.supported_args}")
        self._check_wrapper_kwargs(kwargs, {})
        if not isinstance(pretrained_model, nn.Module) or not hasattr(pretrained_model, "get_output_embeddings"):
            raise TypeError(f"pretrained_model must be a transformers causal LM, got {type(pretrained_model).__name__}")
        super().__init__(pretrained_model, **adapter_kwargs)
        if self.lm_head is None:
            raise ValueError("pretrained_model has no language-model head (get_output_embeddings() is None and no "
                             f"attribute named {' or '.join(self.lm_head_namings)})")
        self.v_head = ValueHead(self.config, **{k: v for k, v in kwargs.items() if k == "summary_dropout_prob"})
        self._init_weights(**kwargs)
        self.v_head.to(self._lm_head_device())

    @classmethod
    def _check_wrapper_kwargs(cls, wrapper_kwargs: dict, pretrained_kwargs: dict) -> None:
        """Refuse bad value-head arguments before anything is built or loaded: `summary_dropout_prob` a number in
        [0, 1) or None, `v_head_initializer_range` a positive finite number or None (0.2),
        `v_head_init_strategy` None or "normal" (TRL ignores another)."""
        super()._check_wrapper_kwargs(wrapper_kwargs, pretrained_kwargs)
        for name in _VALUE_HEAD_NUMBERS:
            _check_value_head_number(name, wrapper_kwargs.get(name))
        strategy = wrapper_kwargs.get("v_head_init_strategy")
        if strategy is not None and not (isinstance(strategy, str) and strategy == "normal"):
            raise ValueError(f"v_head_init_strategy must be None or 'normal', got {strategy!r}")

    def _init_weights(self, **kwargs) -> None:
        """Initialise the value head: `v_head_init_strategy=None` keeps nn.Linear's default (as TRL);
        `"normal"` draws the weight from N(0, `v_head_initializer_range`=0.2) and zeroes the bias."""
        if kwargs.get("v_head_init_strategy") is None:
            return
        std = kwargs.get("v_head_initializer_range")
        nn.init.normal_(self.v_head.summary.weight, mean=0.0, std=0.2 if std is None else std)
        nn.init.zeros_(self.v_head.summary.bias)

    def post_init(self, state_dict) -> None:
        """Load the value head from `state_dict` as TRL's `post_init`: the keys containing `v_head.` (the part
        after it names the head's parameter), non-strictly; other keys are ignored."""
        head = {k[k.index(V_HEAD_PREFIX) + len(V_HEAD_PREFIX):]: v for k, v in state_dict.items() if V_HEAD_PREFIX in k}
        self.v_head.load_state_dict(head, strict=False)

    def _lm_head_device(self) -> torch.device:
        return self.lm_head.weight.device

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        past_key_values=None,
        attention_mask: Optional[torch.Tensor] = None,
        return_past_key_values: bool = False,
        upcast_logits: bool = True,
        output: str = "logits",
        return_values: bool = True,
        **kwargs,
    ):
        """Run the LM and the value head: returns `(lm_logits [B, T, V], loss, value [B, T])`; with
        `return_values=False` the value head does not run and `value` is None (critic-free training).

        Logits are upcast to float32 (TRL's behaviour) unless `upcast_logits=False`, which
        fastppo's trainer uses so that bf16 logits are read once by the log-prob op instead.
        `output="hidden"` skips the LM head and returns the final hidden state `[B, T, H]`
        in the first slot (the LM head's input), for heads applied outside (fused log-probs).
        """
        if output == "hidden":
            hidden = self._last_hidden_state(input_ids, attention_mask, **kwargs)
            return hidden, None, self._values(hidden) if return_values else None
        if output != "logits":
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        if past_key_values is None and not return_past_key_values and self._logits_from_backbone(kwargs):
            hidden = self._last_hidden_state(input_ids, attention_mask, **kwargs)
            logits = self.lm_head(hidden)  # a module call: under ZeRO-3/FSDP its hooks gather the weight
            value = self._values(hidden) if return_values else None
            return (logits.float() if upcast_logits and logits.dtype != torch.float32 else logits), None, value
        kwargs["output_hidden_states"] = True
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        output = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        value = self._values(self._final_hidden_state(output)) if return_values else None
        logits = output.logits
        if upcast_logits and logits.dtype != torch.float32:
            logits = logits.float()
        if return_past_key_values:
            return logits, output.loss, value, output.past_key_values
        return logits, output.loss, value

    def _logits_from_backbone(self, kwargs: dict) -> bool:
        """Whether this call's logits are `lm_head(backbone(...).last_hidden_state)`, which skips the causal LM's
        own forward around the backbone (its output capture of every layer's hidden state for the value head,
        output classes, decorators: ~3 % of a tiny model's PPO step). Only for keyword arguments that merely pass
        through to the backbone, and for models whose logits are the head's output (no softcapping or scaling)."""
        if not _BACKBONE_KWARGS.issuperset(kwargs):
            return False
        plain = getattr(self, "_plain_lm_head", None)
        if plain is None:
            config = self.causal_lm.config
            plain = self._plain_lm_head = (not getattr(config, "is_encoder_decoder", False)
                                           and self.backbone is not self.causal_lm and logits_are_lm_head(config))
        return plain

    def _final_hidden_state(self, output) -> torch.Tensor:
        """The hidden state the value head reads, from the LM's output (an encoder-decoder's: the decoder's)."""
        return output.hidden_states[-1]

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.v_head(hidden.to(self.v_head.summary.weight.device)).squeeze(-1)

    def _last_hidden_state(self, input_ids, attention_mask, **kwargs) -> torch.Tensor:
        # the backbone alone: the LM head's input, without computing the logits
        backbone = self.backbone
        kwargs = drop_unused_tokenizer_outputs(backbone, kwargs)
        return backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def generate(self, *args, **kwargs):
        """`pretrained_model.generate(*args, **kwargs)`."""
        return self.pretrained_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ delegation

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers causal LM (under the PEFT wrapper, for PEFT models)."""
        return self.pretrained_model.get_base_model() if self.is_peft_model else self.pretrained_model

    @property
    def backbone(self) -> nn.Module:
        """The causal LM without its head: returns `last_hidden_state`, the LM head's input."""
        return self.causal_lm.base_model

    @property
    def lm_head(self) -> Optional[nn.Module]:
        """The output projection `[V, H]` (and bias, if any) that turns hidden states into logits."""
        head = self.causal_lm.get_output_embeddings()
        for name in self.lm_head_namings:
            if head is None:
                head = getattr(self.causal_lm, name, None)
        return head

    @property
    def device(self) -> torch.device:
        return self._lm_head_device()

    # ------------------------------------------------------------------ state

    @contextlib.contextmanager
    def module_key_layout(self):
        """`state_dict`/`load_state_dict` with nn.Module's own keys (`pretrained_model.…`) for the
        duration, for tools that map parameters by module path (`sharding.checkpoint_layout` uses it)."""
        self._module_key_layout = True
        try:
            yield
        finally:
            self._module_key_layout = False

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The base model's state dict (none for PEFT models: the adapter is saved by PEFT) plus `v_head.*` keys."""
        if getattr(self, "_module_key_layout", False):
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out = destination if destination is not None else OrderedDict()
        if not self.is_peft_model:
            for key, value in self.pretrained_model.state_dict(keep_vars=keep_vars).items():
                out[prefix + key] = value
        for key, value in self.v_head.state_dict(keep_vars=keep_vars).items():
            out[prefix + V_HEAD_PREFIX + key] = value
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a dict in `state_dict()`'s layout (base keys + `v_head.*`)."""
        if getattr(self, "_module_key_layout", False):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        v_head_state = {k[len(V_HEAD_PREFIX):]: v for k, v in state_dict.items() if k.startswith(V_HEAD_PREFIX)}
        base_state = {k: v for k, v in state_dict.items() if not k.startswith(V_HEAD_PREFIX)}
        self.v_head.load_state_dict(v_head_state, strict=strict, assign=assign)
        return self.pretrained_model.load_state_dict(base_state, strict=strict and not self.is_peft_model,
                                                     assign=assign)


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout probability in `module` to 0 (nn.Dropout layers and float `*dropout*` attributes).

    TRL runs every forward of `step` in eval mode, so dropout never applies there; with
    gradient checkpointing the training forward must run in train mode instead (transformers
    checkpoints only while training), and this keeps the math the same.
    """
    for submodule in module.modules():
        if isinstance(submodule, nn.Dropout):
            submodule.p = 0.0
        for name, value in list(vars(submodule).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(submodule, name, 0.0)


# Where transformer blocks sit in common architectures' parameter names (GPT-2, OPT-style
# decoders, GPT-NeoX, Llama-style), with `{layer}` for the block index; TRL's list.
LAYER_PATTERNS = ("transformer.h.{layer}.", "model.decoder.layers.{layer}.", "gpt_neox.layers.{layer}.",
                  "model.layers.{layer}.")


def create_reference_model(model: AutoModelForCausalLMWithValueHead, num_shared_layers: Optional[int] = None,
                           pattern: Optional[str] = None):
    """A frozen (requires_grad=False, eval mode) copy of `model`, for the KL penalty.

    With `num_shared_layers=n`, every parameter before block n (the embeddings and blocks
    0..n-1, and whatever is tied to them, such as GPT-2's LM head) is frozen in `model` too and
    is the *same tensor* in both models instead of a copy: TRL's math (its reference is a full
    copy, identical while those weights stay frozen) with that much less memory. Blocks are
    found through `pattern` (e.g. "transformer.h.{layer}.") or the common layouts in
    LAYER_PATTERNS. Raises ValueError when no block n exists.
    """
    if not isinstance(model, AutoModelForCausalLMWithValueHead):
        raise TypeError(f"model must be an AutoModelForCausalLMWithValueHead, got {type(model).__name__}")
    shared = []
    if num_shared_layers is not None:
        if isinstance(num_shared_layers, bool) or not isinstance(num_shared_layers, int) or num_shared_layers < 1:
            raise ValueError(f"num_shared_layers must be a positive int or None, got {num_shared_layers!r}")
        shared = _parameters_before_block(model, num_shared_layers, pattern)
        for parameter in shared:
            parameter.requires_grad_(False)
    # deepcopy's memo maps an object's id to its copy: the shared parameters map to themselves
    ref_model = copy.deepcopy(model, {id(parameter): parameter for parameter in shared})
    for parameter in ref_model.parameters():
        parameter.requires_grad_(False)
    return ref_model.eval()


def _parameters_before_block(model: nn.Module, layer: int, pattern: Optional[str]) -> list:
    """`model`'s parameters registered before the first one of block `layer` (named by `pattern`)."""
    named = list(model.named_parameters())
    candidates = [pattern] if pattern is not None else list(LAYER_PATTERNS)
    for candidate in candidates:
        marker = candidate.format(layer=layer)
        first = next((i for i, (name, _) in enumerate(named) if marker in name), None)
        if first is not None:
            return [parameter for _, parameter in named[:first]]
    raise ValueError(f"num_shared_layers={layer}: no parameter name contains "
                     f"{' or '.join(repr(c.format(layer=layer)) for c in candidates)}; the model has fewer blocks, "
                     "or pass pattern= with its block naming, e.g. 'transformer.h.{layer}.'")

