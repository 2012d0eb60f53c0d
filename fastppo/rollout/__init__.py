"""Rollout engines: what samples the responses `PPOTrainer.generate` returns.

One small seam. An engine's `generate(model, queries, max_new_tokens, batch_size, generation_kwargs,
return_logprobs)` returns, per query, the `Sample`s it drew (`fastppo.rollout.outputs`);
`check_kwargs(model, generation_kwargs)` refuses what it cannot honour before anything is drawn;
`weights_changed()` tells it the policy moved; `gathers_own_weights` says whether, under ZeRO-3/FSDP2, it makes
the sharded weights whole itself (else the trainer gathers the whole model around its `generate`). `build_engines` is the one place that picks them:

- `HFEngine` (`rollout_engine="hf"`, the default, `hf_engine.py`): the model's own `generate`,
  `batch_size` queries at a time, left-padded — TRL's behaviour and numbers.
- `VLLMEngine` (`rollout_engine="vllm"`, `vllm_engine.py`): a colocated vLLM engine fed the policy's
  weights in memory (`policy_weights.py`), HF kwargs translated by `sampling.py`.

Log-probs (`return_logprobs=True`) are those of the unmodified model distribution (raw logits at
temperature 1, before top-k/top-p), on both engines: the quantity `step`'s own log-probs measure,
so the two can be compared token for token.
"""

from __future__ import annotations

from .hf_engine import HFEngine


def build_engines(config, accelerator, tokenizer) -> tuple:
    """`(policy engine, HF engine)` for a PPOConfig: the policy's samples come from the first, the reference's
    (`generate_ref_response`) always from HF generate; one `HFEngine` serves both unless
    `rollout_engine="vllm"`, which raises ImportError here, at the trainer's construction, where vLLM is not
    installed. (The engine itself starts at the first `generate`.)"""
    hf_engine = HFEngine(accelerator, tokenizer, backend=config.backend)
    if config.rollout_engine != "vllm":
        return hf_engine, hf_engine
    from .vllm_engine import VLLMEngine, check_vllm_installed

    check_vllm_installed()
    return VLLMEngine(config.vllm_kwargs, seed=config.seed, accelerator=accelerator), hf_engine
