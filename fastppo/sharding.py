"""Sharded training through accelerate: what the trainer does differently under DeepSpeed ZeRO and FSDP2.

accelerate wraps the policy (`prepare`); these helpers cover what it leaves to the trainer:

- the DeepSpeed config values accelerate cannot infer without a dataloader (micro-batch size,
  accumulation, clipping), taken from PPOConfig;
- the reference model as a DeepSpeed inference engine (ZeRO-3 keeps it sharded; below stage 3
  it is a plain replica), as TRL prepares it;
- full weights for the moments that need them: sampling (`gathered`) and a consolidated
  checkpoint (`full_state_dict`, one module's parameters gathered at a time);
- the checkpoint key layout FSDP2's sharded `save_state` needs (`checkpoint_layout`);
- the process count (`world_size`, the one count the trainer and its phases use): torch.distributed's,
  which DeepSpeed initialises even where accelerate's own state says one process (a machine without
  GPUs);
- the bare module under accelerate's wrapper (`unwrap`), looked up once per model.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Optional

import torch
from accelerate.utils import DistributedType

BASE_PREFIX = "pretrained_model."  # AutoModelForCausalLMWithValueHead's submodule; its state_dict drops it


def unwrap(accelerator, model):
    """`accelerator.unwrap_model(model)`, found once per model: accelerate re-checks what is installed on each call
    (about 1 ms where DeepSpeed is installed: it parses the package's metadata), and a step asks every pass."""
    cache = accelerator.__dict__.setdefault("_fastppo_unwrapped", {})
    hit = cache.get(id(model))
    if hit is None or hit[0]() is not model:
        hit = cache[id(model)] = (weakref.ref(model), accelerator.unwrap_model(model))
    return hit[1]


def world_size(accelerator) -> int:
    """Processes in the run: torch.distributed's world when it is up, else accelerate's count."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return accelerator.num_processes


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage (0 when not under DeepSpeed)."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def shards_parameters(accelerator) -> bool:
    """Whether each process holds only a slice of every weight outside forward/backward (ZeRO-3, FSDP)."""
    return zero_stage(accelerator) == 3 or is_fsdp(accelerator)


def _fsdp_modules(module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def check_supported(accelerator) -> None:
    """Refuse a launch accelerate did not set up as asked (`check_launch`), and FSDP1, which wraps the policy in
    flat parameters that generate and the consolidated save do not unpack."""
    check_launch(accelerator)
    if is_fsdp(accelerator) and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise ValueError("FSDP: fastppo supports FSDP2 (torch fully_shard) only; set fsdp_version: 2 in the "
                         "accelerate config (examples/accelerate/fsdp2.yaml)")


LAUNCH_HELP = ("launch with `accelerate launch` and an accelerate config (multi-GPU DDP, DeepSpeed or FSDP2: "
               "examples/accelerate/), one process per GPU; on a CPU machine DDP over gloo needs "
               "PPOConfig(accelerator_kwargs={'cpu': True}) (docs/distributed.md)")


def check_launch(accelerator) -> None:
    """A ValueError, raised alike on every process, where the processes would otherwise train apart or fail deep in
    a collective: several processes that accelerate set up no distributed training for (`torchrun` without an
    accelerate config: no gradient would be synchronised); accelerate counting fewer processes than
    torch.distributed (DeepSpeed on a machine without GPUs: every process believes it is process 0); a launch
    that asked for DeepSpeed or FSDP (ACCELERATE_USE_*) and got something else."""
    import os

    kind = accelerator.distributed_type
    for name, wanted in (("DEEPSPEED", DistributedType.DEEPSPEED), ("FSDP", DistributedType.FSDP)):
        if os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true" and kind != wanted:
            raise ValueError(f"the launch asked for {wanted.value} (ACCELERATE_USE_{name}=true), but accelerate set "
                             f"up {kind.value}"
                             + (" (it selects FSDP only where it sees GPUs)" if name == "FSDP" else "")
                             + f": the policy would train unsharded; {LAUNCH_HELP}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world > 1 and kind == DistributedType.NO:
        raise ValueError(f"torch.distributed runs {world} processes, but accelerate set up no distributed training "
                         "for them (distributed_type NO): each would train its own copy of the model, no gradient "
                         f"synchronised; {LAUNCH_HELP}")
    if accelerator.num_processes != world or accelerator.process_index != torch.distributed.get_rank():
        raise ValueError(f"accelerate counts {accelerator.num_processes} process(es) and calls this one "
                         f"{accelerator.process_index}, but torch.distributed runs {world} and calls it "
                         f"{torch.distributed.get_rank()} ({kind.value}; under DeepSpeed on a machine without GPUs "
                         "accelerate picks no process group of its own): the ranks would gather and shard as if "
                         f"alone; {LAUNCH_HELP}")


def configure_deepspeed(accelerator, config) -> None:
    """Fill the DeepSpeed config entries accelerate leaves "auto" without a dataloader, from PPOConfig.

    A value the user set explicitly must agree with PPOConfig: DeepSpeed would otherwise train
    with other batch or clipping settings than the ones the trainer's math assumes.
    """
    if not is_deepspeed(accelerator):
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": config.mini_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        # accelerate's clip_grad_norm_ is a no-op under DeepSpeed: the engine clips, with this value
        "gradient_clipping": float(config.max_grad_norm) if config.max_grad_norm is not None else 0.0,
    }
    for key, value in wanted.items():
        current = ds_config.get(key, "auto")
        if current == "auto":
            ds_config[key] = value
        elif float(current) != float(value):
            raise ValueError(f"the DeepSpeed config sets {key}={current}, but PPOConfig implies {value}; "
                             f"leave it 'auto' (PPOConfig's mini_batch_size, gradient_accumulation_steps and "
                             "max_grad_norm decide it)")
    ds_config.pop("train_batch_size", None)  # DeepSpeed derives it: micro-batch × accumulation × world


def prepare_reference(accelerator, ref_model, mini_batch_size: int):
    """The frozen reference, ready for forward passes on every process.

    Under DeepSpeed: an inference engine (no optimizer) with the policy's config; ZeRO-3 keeps
    it sharded, lower stages hold a full copy (stage 0). Elsewhere: accelerate's evaluation-mode
    preparation, as before.
    """
    if not is_deepspeed(accelerator):
        return accelerator.prepare_model(ref_model, evaluation_mode=True)
    import deepspeed

    ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        ds_config.pop(key, None)
    ds_config["train_micro_batch_size_per_gpu"] = mini_batch_size
    ds_config["gradient_accumulation_steps"] = 1
    ds_config.pop("train_batch_size", None)
    zero = ds_config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        ds_config["zero_optimization"] = {"stage": 0}
    else:
        zero.pop("offload_optimizer", None)  # nothing to offload: no optimizer
    engine, *_ = deepspeed.initialize(model=ref_model, config=ds_config)
    engine.eval()
    return engine


@contextlib.contextmanager
def gathered(accelerator, model):
    """Full weights of `model` on every process for the duration (ZeRO-3), e.g. to sample from it.

    Each process then holds the whole model once: the limit of sharded generation (docs/distributed.md).
    A no-op where weights are not sharded.
    """
    if not shards_parameters(accelerator):
        yield
        return
    if is_fsdp(accelerator):  # every fully_shard group unsharded and kept so until the end: no collectives
        modules = _fsdp_modules(unwrap(accelerator, model))
        reshard = accelerator.state.fsdp_plugin.reshard_after_forward
        for module in modules:
            module.unshard()
            module.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for module in modules:
                module.set_reshard_after_forward(reshard)
                module.reshard()
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(unwrap(accelerator, model).parameters())):
        yield


def full_state_dict(accelerator, model) -> Optional[dict]:
    """The value-head model's full state dict (its own key layout) on the main process, None elsewhere.

    Every process must call it. Under ZeRO-3 one module's parameters are gathered at a time,
    so no process holds more than the finished CPU copy and one module's full weights.
    """
    unwrapped = unwrap(accelerator, model)
    main = accelerator.is_main_process
    if not shards_parameters(accelerator):
        return {k: v.detach().cpu() for k, v in unwrapped.state_dict().items()} if main else None
    if is_fsdp(accelerator):
        return _fsdp_full_state_dict(unwrapped, main)
    import deepspeed

    full, copies = {}, {}  # copies by parameter: tied weights stay one tensor, as save_pretrained expects
    for module_name, module in unwrapped.named_modules(remove_duplicate=False):
        named = list(module.named_parameters(prefix=module_name, recurse=False))
        if not named:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            if main:
                for name, p in named:
                    full[name] = copies.setdefault(id(p), p.detach().cpu().clone())
    if not main:
        return None
    state = {}
    for key, value in unwrapped.state_dict().items():  # the layout; parameters come from the gathered copy
        state[key] = full.get(BASE_PREFIX + key, full.get(key, value.detach().cpu()))
    return state


def _fsdp_full_state_dict(unwrapped, main: bool) -> Optional[dict]:
    """FSDP2: each DTensor made whole in turn (every process, the same order); tied weights stay one tensor."""
    from torch.distributed.tensor import DTensor

    state, copies = {}, {}  # by parameter object (keep_vars): the same on every process, so the same collectives
    for key, value in unwrapped.state_dict(keep_vars=True).items():
        if isinstance(value, DTensor):
            if id(value) not in copies:
                copies[id(value)] = value.full_tensor().detach().cpu()
            value = copies[id(value)]
        if main:
            state[key] = value.detach().cpu()
    return state if main else None


def full_weights(accelerator, module):
    """`(key, full tensor)` for every entry of `module.state_dict()`, in its order, each made whole only in its turn
    (ZeRO-3: that parameter gathered; FSDP2: that DTensor's `full_tensor()`), so no process holds more than one
    tensor beyond its shards — what a rollout engine's weight sync needs. Every process must draw the same entries
    in the same order (the gathers are collectives). Elsewhere the module's own tensors, detached."""
    if not shards_parameters(accelerator):
        for key, value in module.state_dict().items():
            yield key, value.detach()
        return
    state = module.state_dict(keep_vars=True)
    if is_fsdp(accelerator):
        from torch.distributed.tensor import DTensor

        for key, value in state.items():
            yield key, (value.full_tensor() if isinstance(value, DTensor) else value).detach()
        return
    import deepspeed

    for key, value in state.items():
        if not hasattr(value, "ds_id"):  # a buffer: never partitioned
            yield key, value.detach()
            continue
        with deepspeed.zero.GatheredParameters([value]):
            whole = value.detach().clone()  # the gathered storage is released when the context ends
        yield key, whole


def checkpoint_layout(accelerator, models) -> contextlib.ExitStack:
    """The context `save_state`/`load_state` run in: under FSDP2, torch.distributed.checkpoint addresses
    weights by module path, so every value-head model accelerate prepared (`models`, None skipped) shows
    nn.Module's own keys (`module_key_layout`) instead of its TRL checkpoint layout. A no-op elsewhere."""
    stack = contextlib.ExitStack()
    if is_fsdp(accelerator):
        for model in models:
            if model is not None:
                stack.enter_context(unwrap(accelerator, model).module_key_layout())
    return stack


def vocab_size(lm_head_weight: torch.Tensor) -> int:
    """Rows of the LM head's weight; a ZeRO-3 shard keeps the full shape in `ds_shape`."""
    return int(getattr(lm_head_weight, "ds_shape", lm_head_weight.shape)[0])
