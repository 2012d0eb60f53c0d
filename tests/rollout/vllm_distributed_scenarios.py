"""Runs a vLLM rollout scenario on each of 2 processes (`accelerate launch`, gloo) and writes each rank's JSON.

`tests/rollout/test_vllm_rollouts.py` launches it under DDP, ZeRO-3 or FSDP2 (the launch config decides):

    accelerate launch ... tests/rollout/vllm_distributed_scenarios.py SCENARIO MODEL_DIR TOKENIZER_DIR OUT_DIR

`sync`: one engine per process; 3 rounds of generate (this rank's own queries) → step at a high learning rate,
each rank recording how far its engine's log-probs are from its policy's; then a control whose sync is skipped,
greedy vLLM against greedy HF, and one sampled draw of the same queries on both ranks (seeds differ per rank).
`tp2`: the same rounds with `tensor_parallel_size=2`, one engine over both processes.
"""

from __future__ import annotations

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "distributed")]
os.environ.setdefault("FASTPPO_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastppo import PPOTrainer, sharding  # noqa: E402
import sharded_scenarios  # noqa: E402
from vllm_scenarios import SAMPLING, max_gap, train_rounds  # noqa: E402
from vllm_scenarios import policy_logprobs as unsharded_policy_logprobs  # noqa: E402

RANK_QUERIES = {0: [[5, 6, 7], [9, 10]], 1: [[11, 12, 13, 14], [20, 21]]}  # each rank's own
SHARED_QUERIES = [[30, 31, 32], [40]]
VLLM_KWARGS = {"max_model_len": 128, "enforce_eager": True, "kv_cache_memory_bytes": 1 << 26}


def build(model_dir: str, tokenizer_dir: str, **vllm_kwargs) -> PPOTrainer:
    return sharded_scenarios.build(model_dir, tokenizer_dir, learning_rate=1e-2, init_kl_coef=0.05,
                                   use_score_scaling=False, rollout_engine="vllm",
                                   vllm_kwargs={**VLLM_KWARGS, **vllm_kwargs})


def policy_logprobs(trainer, queries, responses) -> list:
    """The policy's own log-probs of the responses, from its whole weights (gathered under ZeRO-3 / FSDP2)."""
    with sharding.gathered(trainer.accelerator, trainer.model):
        return unsharded_policy_logprobs(trainer, queries, responses)


def weights_sum(trainer) -> float:
    return float(sum(tensor.double().sum() for _, tensor in sharding.full_weights(
        trainer.accelerator, trainer.unwrapped_model.pretrained_model)))


def main(scenario: str, model_dir: str, tokenizer_dir: str, out_dir: str) -> None:
    tp = 2 if scenario == "tp2" else 1
    trainer = build(model_dir, tokenizer_dir, **({"tensor_parallel_size": tp} if tp > 1 else {}))
    rank = torch.distributed.get_rank()
    queries = [torch.tensor(q) for q in RANK_QUERIES[rank]]
    # the engine's construction, first sync and sampling leave the trainer's random streams where they were
    streams = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = [t.tolist() for t in trainer.generate([torch.tensor(q) for q in SHARED_QUERIES], **SAMPLING)]
    kept = (torch.equal(streams[0], torch.get_rng_state()) and (streams[1] == np.random.get_state()[1]).all()
            and streams[2] == random.getstate())
    report = {"world_size": trainer.config.world_size, "distributed_type": trainer.accelerator.distributed_type.value,
              "local_numel": sum(getattr(p, "_local_tensor", p).numel() for p in trainer.model.parameters()),
              "numel": sum(t.numel() for _, t in sharding.full_weights(trainer.accelerator, trainer.unwrapped_model)),
              "rng_kept": bool(kept), "first_draw": first}
    report["rounds"] = train_rounds(trainer, queries, 3, policy_logprobs, lambda t: {"weights_sum": weights_sum(t)})
    # the control: a step the engine is not told of leaves its log-probs stale
    responses, logprobs = trainer.generate(queries, return_prompt=False, return_logprobs=True, **SAMPLING)
    trainer.step(queries, responses, [torch.tensor(1.0)] * 2, rollout_logprobs=logprobs)
    trainer.rollout_engine.stale = False
    responses, logprobs = trainer.generate(queries, return_prompt=False, return_logprobs=True, **SAMPLING)
    report["unsynced_gap"] = max_gap(logprobs, policy_logprobs(trainer, queries, responses))
    trainer.rollout_engine.weights_changed()
    greedy = dict(do_sample=False, max_new_tokens=8, eos_token_id=None)
    report["greedy_vllm"] = [t.tolist() for t in trainer.generate(queries, return_prompt=False, **greedy)]
    with sharding.gathered(trainer.accelerator, trainer.model):  # HF generate samples from the whole weights
        samples = trainer.hf_engine.generate(trainer.model, queries, None, 2, dict(greedy, pad_token_id=0))
    report["greedy_hf"] = [s[0].tokens.tolist() for s in samples]
    shared = [torch.tensor(q) for q in SHARED_QUERIES]
    report["shared_draw"] = [t.tolist() for t in trainer.generate(shared, return_prompt=False, **SAMPLING)]
    with open(os.path.join(out_dir, f"rank{rank}-{scenario}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(*sys.argv[1:5])
