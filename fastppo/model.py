"""A causal LM with a scalar value head, checkpoint-compatible with TRL's.

`AutoModelForCausalLMWithValueHead` wraps any `transformers` causal LM
(`pretrained_model`) and adds `v_head`, a dropout + `Linear(hidden, 1)` over the last
hidden state. Its checkpoints are the base model's plus `v_head.summary.weight` and
`v_head.summary.bias` (safetensors), exactly TRL's layout: a TRL checkpoint loads here,
ours loads in TRL, and plain `AutoModelForCausalLM.from_pretrained(dir)` loads the LM.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

V_HEAD_PREFIX = "v_head."
V_HEAD_FILE = "v_head.safetensors"  # PEFT checkpoints: the adapter is saved apart, the head here


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _hidden_size(config) -> int:
    for name in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):
        size = getattr(config, name, None)
        if isinstance(size, int):
            return size
    text_config = getattr(config, "text_config", None)
    if text_config is not None:
        return _hidden_size(text_config)
    raise ValueError(f"cannot find the hidden size in the model config {type(config).__name__}")


class ValueHead(nn.Module):
    """Dropout + Linear(hidden, 1): one value per position. Computes in its own dtype (float32 by default)."""

    def __init__(self, hidden_size: int, summary_dropout_prob: Optional[float] = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(summary_dropout_prob) if summary_dropout_prob else nn.Identity()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states `[B, T, H]` → values `[B, T, 1]` in the head's dtype."""
        hidden_states = self.dropout(hidden_states)
        if hidden_states.dtype != self.summary.weight.dtype:
            hidden_states = hidden_states.to(self.summary.weight.dtype)
        return self.summary(hidden_states)


class PreTrainedModelWrapper(nn.Module):
    """TRL's base class of models that wrap a transformers model (`pretrained_model`): here the base
    of AutoModelForCausalLMWithValueHead, so TRL code that checks `isinstance(m, PreTrainedModelWrapper)`
    or subclasses it keeps working."""

    transformers_parent_class = None
    supported_args = ()


class AutoModelForCausalLMWithValueHead(PreTrainedModelWrapper):
    """A transformers causal LM (`pretrained_model`) plus a value head (`v_head`).

    `forward` returns `(lm_logits, loss, value)` as TRL's class does; `generate`
    delegates to the wrapped model.
    """

    transformers_parent_class = AutoModelForCausalLM
    supported_args = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")

    def __init__(self, pretrained_model: PreTrainedModel, **kwargs):
        super().__init__()
        unknown = set(kwargs) - set(self.supported_args)
        if unknown:
            raise TypeError(f"unexpected value-head arguments {sorted(unknown)}; supported: {self.supported_args}")
        if not isinstance(pretrained_model, nn.Module) or not hasattr(pretrained_model, "get_output_embeddings"):
            raise TypeError(f"pretrained_model must be a transformers causal LM, got {type(pretrained_model).__name__}")
        if pretrained_model.get_output_embeddings() is None:
            raise ValueError("pretrained_model has no language-model head (get_output_embeddings() is None)")
        self.pretrained_model = pretrained_model
        self.is_peft_model = _is_peft_model(pretrained_model)
        dropout = kwargs.get("summary_dropout_prob", getattr(self.config, "summary_dropout_prob", 0.1))
        self.v_head = ValueHead(_hidden_size(self.config), dropout)
        self._init_v_head(kwargs.get("v_head_init_strategy"), kwargs.get("v_head_initializer_range", 0.2))
        self.v_head.to(self._lm_head_device())

    def _init_v_head(self, strategy: Optional[str], initializer_range: float) -> None:
        if strategy is None:
            return  # nn.Linear's default initialisation, as in TRL
        if strategy != "normal":
            raise ValueError(f"v_head_init_strategy must be None or 'normal', got {strategy!r}")
        nn.init.normal_(self.v_head.summary.weight, mean=0.0, std=initializer_range)
        nn.init.zeros_(self.v_head.summary.bias)

    def _lm_head_device(self) -> torch.device:
        return self.pretrained_model.get_output_embeddings().weight.device

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> "AutoModelForCausalLMWithValueHead":
        """Load a causal LM (a path, a hub name, or an already built model) and its value head if saved.

        Value-head kwargs (`summary_dropout_prob`, `v_head_init_strategy`,
        `v_head_initializer_range`) are split off; `peft_config` wraps the model with PEFT;
        everything else (`dtype`, `attn_implementation`, `device_map`, ...) goes to
        `AutoModelForCausalLM.from_pretrained`. A PEFT checkpoint (a directory or hub repo with
        `adapter_config.json`, as `save_pretrained` writes for a PEFT policy) loads its base
        model, then the adapter on top — frozen unless `is_trainable=True`, as in TRL — and
        its value head.
        """
        v_head_kwargs = {name: kwargs.pop(name) for name in cls.supported_args if name in kwargs}
        peft_config = kwargs.pop("peft_config", None)
        is_trainable = kwargs.pop("is_trainable", False)
        adapter_source = None
        if isinstance(pretrained_model_name_or_path, nn.Module):
            base = pretrained_model_name_or_path
            source = None
        else:
            source = os.fspath(pretrained_model_name_or_path)
            if peft_config is None and _resolve_file(source, "adapter_config.json", kwargs) is not None:
                from peft import PeftConfig

                adapter_source = source
                load_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "token", "subfolder")}
                base_path = PeftConfig.from_pretrained(source, **load_kwargs).base_model_name_or_path
                base = cls.transformers_parent_class.from_pretrained(base_path, *model_args, **kwargs)
            else:
                base = cls.transformers_parent_class.from_pretrained(source, *model_args, **kwargs)
        if adapter_source is not None:
            from peft import PeftModel

            base = PeftModel.from_pretrained(base, adapter_source, is_trainable=is_trainable)
        if peft_config is not None:
            from peft import get_peft_model

            base = get_peft_model(base, peft_config)
        model = cls(base, **v_head_kwargs)
        if source is not None:
            state = _load_v_head_state(source, kwargs)
            if state:
                model.v_head.load_state_dict(state)
        return model

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        past_key_values=None,
        attention_mask: Optional[torch.Tensor] = None,
        return_past_key_values: bool = False,
        upcast_logits: bool = True,
        output: str = "logits",
        **kwargs,
    ):
        """Run the LM and the value head: returns `(lm_logits [B, T, V], loss, value [B, T])`.

        Logits are upcast to float32 (TRL's behaviour) unless `upcast_logits=False`, which
        fastppo's trainer uses so that bf16 logits are read once by the log-prob op instead.
        `output="hidden"` skips the LM head and returns the final hidden state `[B, T, H]`
        in the first slot (the LM head's input), for heads applied outside (fused log-probs).
        """
        if output == "hidden":
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            value = self.v_head(hidden.to(self.v_head.summary.weight.device)).squeeze(-1)
            return hidden, None, value
        if output != "logits":
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        kwargs["output_hidden_states"] = True
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        output = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        last_hidden = output.hidden_states[-1]
        value = self.v_head(last_hidden.to(self.v_head.summary.weight.device)).squeeze(-1)
        logits = output.logits
        if upcast_logits and logits.dtype != torch.float32:
            logits = logits.float()
        if return_past_key_values:
            return logits, output.loss, value, output.past_key_values
        return logits, output.loss, value

    def generate(self, *args, **kwargs):
        """`pretrained_model.generate(*args, **kwargs)`."""
        return self.pretrained_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ delegation

    @property
    def config(self):
        return self.pretrained_model.config

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers causal LM (under the PEFT wrapper, for PEFT models)."""
        return self.pretrained_model.get_base_model() if self.is_peft_model else self.pretrained_model

    @property
    def backbone(self) -> nn.Module:
        """The causal LM without its head: returns `last_hidden_state`, the LM head's input."""
        return self.causal_lm.base_model

    @property
    def lm_head(self) -> nn.Module:
        """The output projection `[V, H]` (and bias, if any) that turns hidden states into logits."""
        return self.causal_lm.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self._lm_head_device()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.pretrained_model.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.pretrained_model.gradient_checkpointing_disable()

    # ------------------------------------------------------------------ saving

    @contextlib.contextmanager
    def module_key_layout(self):
        """`state_dict`/`load_state_dict` with nn.Module's own keys (`pretrained_model.…`) for the
        duration: torch.distributed.checkpoint maps parameters by module path (FSDP2 save/load_state)."""
        self._module_key_layout = True
        try:
            yield
        finally:
            self._module_key_layout = False

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The base model's state dict (the adapter's alone for PEFT models) plus `v_head.*` keys."""
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
        return self.pretrained_model.load_state_dict(base_state, strict=strict and not self.is_peft_model, assign=assign)

    def save_pretrained(self, save_directory, **kwargs):
        """Save with transformers' `save_pretrained`, the value head's keys beside the base weights.

        For a PEFT model the adapter is saved by PEFT and the head to `v_head.safetensors`.
        """
        if self.is_peft_model:
            from safetensors.torch import save_file

            os.makedirs(save_directory, exist_ok=True)
            state = {V_HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.v_head.state_dict().items()}
            save_file(state, os.path.join(save_directory, V_HEAD_FILE))
            return self.pretrained_model.save_pretrained(save_directory, **kwargs)
        if kwargs.get("state_dict") is None:
            kwargs["state_dict"] = self.state_dict()
        return self.pretrained_model.save_pretrained(save_directory, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """Push the base model with the value head's weights to the hub (transformers' `push_to_hub`)."""
        with self._v_head_attached():
            return self.pretrained_model.push_to_hub(*args, **kwargs)

    @contextlib.contextmanager
    def _v_head_attached(self):
        # transformers serialises `pretrained_model.state_dict()`; registering the head as its
        # submodule for the duration puts `v_head.summary.*` among the saved keys.
        self.pretrained_model.add_module("v_head", self.v_head)
        try:
            yield
        finally:
            del self.pretrained_model._modules["v_head"]


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


def _load_v_head_state(source: str, load_kwargs: dict) -> dict:
    """The `v_head.*` tensors stored with a checkpoint (prefix stripped), or {} if there are none."""
    for filename in (V_HEAD_FILE, "model.safetensors.index.json", "model.safetensors",
                     "pytorch_model.bin.index.json", "pytorch_model.bin"):
        path = _resolve_file(source, filename, load_kwargs)
        if path is None:
            continue
        if filename.endswith(".index.json"):
            with open(path) as handle:
                weight_map = json.load(handle)["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if V_HEAD_PREFIX in key})
            state = {}
            for shard in shards:
                shard_path = _resolve_file(source, shard, load_kwargs)
                if shard_path is not None:
                    state.update(_read_v_head_keys(shard_path))
        else:
            state = _read_v_head_keys(path)
        if state:
            return state
    return {}


def _read_v_head_keys(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return {_strip_v_head(k): handle.get_tensor(k) for k in handle.keys() if V_HEAD_PREFIX in k}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {_strip_v_head(k): v for k, v in state.items() if V_HEAD_PREFIX in k}


def _strip_v_head(key: str) -> str:
    return key[key.index(V_HEAD_PREFIX) + len(V_HEAD_PREFIX):]


def _resolve_file(source: str, filename: str, load_kwargs: dict) -> Optional[str]:
    subfolder = load_kwargs.get("subfolder") or ""
    if os.path.isdir(source):
        path = os.path.join(source, subfolder, filename)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(
            source, filename, subfolder=subfolder or None, revision=load_kwargs.get("revision"),
            cache_dir=load_kwargs.get("cache_dir"), token=load_kwargs.get("token"),
        )
    except Exception:  # absent file, offline, or no such repo: no value head to restore
        return None
