"""The policy's language-model weights under their checkpoint names, for a rollout engine.

`lm_weights(model)` yields `(name, tensor)` pairs of the wrapped causal LM as a plain
transformers checkpoint names them (`model.layers.0.self_attn.q_proj.weight`, …) — the
value head is never among them. For a PEFT LoRA policy each adapted weight is yielded merged
(base + B·A·scaling), computed one layer at a time without touching the model: merging in
place and unmerging again would leave float residue in the base weights the trainer keeps.
"""

from __future__ import annotations

import re
from typing import Iterator

import torch

# PEFT's state-dict plumbing: adapter tensors, the base layer a LoRA layer wraps, and the
# trainable copy (`modules_to_save`) that replaces a module while an adapter is active.
_LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def lm_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` for every weight of `model.pretrained_model` (adapters merged), detached."""
    if not model.is_peft_model:
        for name, tensor in model.pretrained_model.state_dict().items():
            yield name, tensor.detach()
        return
    yield from _merged_peft_weights(model.pretrained_model)


@torch.no_grad()
def _merged_peft_weights(peft_model) -> Iterator[tuple[str, torch.Tensor]]:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    if not isinstance(peft_model.peft_config[adapter], LoraConfig):
        raise ValueError(f"rollout_engine='vllm' syncs LoRA adapters merged into the base weights; the active adapter "
                         f"{adapter!r} is a {type(peft_model.peft_config[adapter]).__name__}")
    base = peft_model.get_base_model()
    lora_layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for key, tensor in base.state_dict().items():
        if _LORA_KEY.search(key) or ".original_module." in key:
            continue
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key).replace(".base_layer.", ".")
        owner, _, leaf = name.rpartition(".")
        layer = lora_layers.get(owner)
        if layer is not None and leaf == "weight":
            tensor = tensor + _delta(layer, owner)
        yield name, tensor.detach()


def _delta(layer, name: str) -> torch.Tensor:
    """What the active adapters add to `layer`'s base weight (0 when merged or disabled)."""
    delta = 0
    if layer.merged or layer.disable_adapters:
        return delta
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue
        if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter):
            raise ValueError(f"rollout_engine='vllm': {name} uses a LoRA variant (DoRA or lora_bias) that fastppo "
                             "cannot merge for syncing; use a plain LoRA adapter or rollout_engine='hf'")
        delta = delta + layer.get_delta_weight(adapter)
    return delta
