"""What PPOTrainer checks before it builds or saves anything: its arguments, what the run's set-up (sharding,
vLLM, micro-batches, LM-head path) cannot do, how the models, tokenizer and optimizer pair up, the
precision the weights train in, and that no weight written is NaN/inf."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from transformers import PreTrainedTokenizerBase

from .. import sharding
from ..config import PPOConfig
from ..models import heads
from ..models.value_head import AutoModelForCausalLMWithValueHead
from . import padding, step_guard


def refuse_nonfinite(named_tensors) -> None:
    name = step_guard.first_nonfinite(named_tensors)
    if name is not None:
        raise ValueError(f"save_pretrained: the weight {name} holds NaN/inf; refusing to write a poisoned checkpoint")


def max_positions(model) -> Optional[int]:
    """The longest sequence the model's config admits (n_positions / max_position_embeddings), if it says."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def vocabulary(model) -> int:
    return sharding.vocab_size(model.lm_head.weight)


def check_model_pairing(model, ref_model, optimizer) -> None:
    """The reference and the optimizer belong with the policy. (A tokenizer may list more tokens than the
    model has rows, as GPT-2's slow tokenizer does: `step` and `generate` check each token id instead.)"""
    vocab = vocabulary(model)
    if ref_model is not None and vocabulary(ref_model) != vocab:
        raise ValueError(f"ref_model has a vocabulary of {vocabulary(ref_model)} tokens but the policy has {vocab}: "
                         "the KL penalty compares their log-probs token by token, so they must share a tokenizer")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if trainable and not trainable & held:
        raise ValueError("optimizer holds none of the policy's trainable parameters (was it built for another model, "
                         "or before from_pretrained/get_peft_model replaced them?)")


def warn_low_precision_training(model, accelerator) -> None:
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16,
                                                                                                torch.float16)})
    if dtypes and accelerator.mixed_precision == "no":
        warnings.warn(f"trainable parameters are {', '.join(dtypes)} and no mixed precision is configured: the "
                      "optimizer updates them in that precision, where most small updates round away (e.g. LayerNorm "
                      "weights never move at lr 1e-5). Load the weights in float32 and set mixed precision "
                      "(Accelerator / `accelerate launch --mixed_precision bf16`, or PPOConfig(accelerator_kwargs="
                      "{'mixed_precision': 'bf16'})); see docs/robustness.md, 'bf16 weights'")


def check_constructor_args(config, model, ref_model, tokenizer, optimizer, num_shared_layers, lr_scheduler) -> None:
    if not isinstance(config, PPOConfig):
        raise TypeError(f"config must be a fastppo.PPOConfig, got {type(config).__name__}")
    if not isinstance(model, AutoModelForCausalLMWithValueHead):
        raise TypeError(f"model must be a fastppo.AutoModelForCausalLMWithValueHead, got {type(model).__name__}")
    if ref_model is not None and not isinstance(ref_model, AutoModelForCausalLMWithValueHead):
        raise TypeError(f"ref_model must be an AutoModelForCausalLMWithValueHead or None, got {type(ref_model).__name__}")
    if ref_model is model:
        raise ValueError("ref_model must not be the policy model itself; pass None for a frozen copy")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    padding.padding_side(tokenizer)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if lr_scheduler is not None and not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(f"lr_scheduler must be a torch LRScheduler or None, got {type(lr_scheduler).__name__}")
    if num_shared_layers is not None and (isinstance(num_shared_layers, bool) or not isinstance(num_shared_layers, int)
                                          or num_shared_layers < 1):
        raise ValueError(f"num_shared_layers must be a positive int or None, got {num_shared_layers!r}")


def check_environment(config, accelerator, model, ref_model, num_shared_layers, head_mode: str) -> None:
    """Refuse, before anything is built, a configuration this run's set-up cannot train as asked: FSDP1,
    the response-only/fused LM-head paths on a transformed head or sharded weights, shared layers
    between a sharded policy and reference, token-budget micro-batches under DeepSpeed, and the vLLM
    engine with several processes (`fastppo.rollout.build_engines` refuses it without vLLM installed).
    A `num_shared_layers` that would be ignored warns."""
    if head_mode != "full":
        heads.check_plain_lm_head(model)
        if sharding.shards_parameters(accelerator):
            raise ValueError("response_only_logits/fused_lm_head read the LM head's weight directly, which ZeRO-3 "
                             "and FSDP shard across processes; leave both False there")
    if num_shared_layers is not None and (ref_model is not None or model.is_peft_model):
        warnings.warn("num_shared_layers is ignored: " + ("a ref_model was given" if ref_model is not None
                      else "a PEFT model's reference is its base with the adapter disabled, nothing is copied"))
    elif num_shared_layers is not None and (sharding.is_fsdp(accelerator) or sharding.is_deepspeed(accelerator)):
        raise ValueError(f"num_shared_layers: {accelerator.distributed_type.value} shards the policy and the "
                         "reference separately, so they cannot share tensors; leave it None there")
    sharding.check_supported(accelerator)
    if config.max_tokens_per_microbatch is not None and sharding.is_deepspeed(accelerator):
        raise ValueError("max_tokens_per_microbatch: DeepSpeed's engine steps the optimizer after a fixed count "
                         "of backward passes, which token-budget micro-batches vary; leave it None under DeepSpeed")
    _check_encoder_decoder(config, accelerator, model, ref_model, head_mode)
    processes = sharding.world_size(accelerator)
    if config.rollout_engine == "vllm" and processes > 1:  # one engine per process, or per tensor-parallel group
        tp = config.vllm_kwargs.get("tensor_parallel_size", 1)
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or processes % tp:
            raise ValueError(f"PPOConfig.vllm_kwargs['tensor_parallel_size']={tp!r} must be a positive integer that "
                             f"divides the {processes} processes: each group of that many ranks shares one engine")
        backend = config.vllm_kwargs.get("distributed_executor_backend", "external_launcher")
        if backend != "external_launcher":
            raise ValueError(f"PPOConfig.vllm_kwargs['distributed_executor_backend']={backend!r}: with several "
                             "processes each one's engine joins the trainer's world ('external_launcher', the "
                             "default); leave it unset")


def drop_unneeded_reference(config, ref_model, num_shared_layers):
    """`ref_model`, or None when no step compares with a reference (`config.needs_reference` False: init_kl_coef and
    kl_loss_coef 0), with a warning if one was given (it would never run) or layers were to be shared with it."""
    if config.needs_reference:
        return ref_model
    if ref_model is not None or num_shared_layers is not None:
        warnings.warn("init_kl_coef and kl_loss_coef are 0, so no step compares the policy with a reference: "
                      f"{'the ref_model given' if ref_model is not None else 'num_shared_layers'} is not used, and "
                      "objective/kl is 0")
    return None


def _check_encoder_decoder(config, accelerator, model, ref_model, head_mode: str) -> None:
    """An encoder-decoder policy trains on TRL's path (padded rows, full logits, HF generate, one process or DDP);
    refuse what fastppo adds there and has not made or tested for such models, naming the setting."""
    encoder_decoder = getattr(model, "is_encoder_decoder", False)
    if ref_model is not None and getattr(ref_model, "is_encoder_decoder", False) != encoder_decoder:
        raise ValueError(f"ref_model is {'an encoder-decoder' if not encoder_decoder else 'a causal'} model but the "
                         "policy is not: the KL penalty compares their log-probs on the same rows")
    if not encoder_decoder:
        return
    refused = {"padding_free": config.padding_free, "response_only_logits/fused_lm_head": head_mode != "full",
               "rollout_engine='vllm'": config.rollout_engine == "vllm",
               "rollout_correction": config.rollout_correction is not None,
               f"{accelerator.distributed_type.value} (sharded weights)": sharding.is_deepspeed(accelerator)
               or sharding.is_fsdp(accelerator)}
    for name, chosen in refused.items():
        if chosen:
            raise ValueError(f"{name}: not supported for encoder-decoder models ({type(model.causal_lm).__name__}); "
                             "they train on TRL's path: padded rows, full logits, HF generate, one process or DDP")


def check_config_unchanged(config, at_start: dict) -> None:
    """ValueError naming the config fields changed since the trainer was built (from `at_start`, its `to_dict()`)."""
    now = config.to_dict()
    changed = sorted(k for k, v in at_start.items() if now.get(k) != v)
    if changed:
        raise ValueError(f"config fields {changed} changed after the PPOTrainer was built, which it does not "
                         "follow (the optimizer, accelerator and controllers were set up from them); build a new "
                         "trainer, or set them back")
