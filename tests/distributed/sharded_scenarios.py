"""Run by tests/distributed/test_sharded.py under `accelerate launch` (2 CPU processes, gloo): the same PPO run
under DDP, ZeRO-2, ZeRO-3 or FSDP2, each rank writing what the test compares.

    accelerate launch ... tests/sharded_scenarios.py run|resume MODEL_DIR TOKENIZER_DIR OUT_DIR

run: greedy `generate` on this rank's queries, step 1, `save_state(OUT/state)`, step 2,
`save_pretrained(OUT/model)` (called on every rank, as a sharded save must be). resume (fresh
processes): `load_state(OUT/state)`, step 2, `save_pretrained(OUT/resumed)`. Each rank's data
differs (its seed is its rank), so the global batch is the same under every backend. SGD: Adam
turns reduction-order noise on near-zero gradients into learning-rate-sized moves.
OUT/rank{r}-{scenario}.json holds the world size, the generated tokens and each step's stats.
"""

import json
import os
import sys

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import end_process_group, make_batch  # noqa: E402
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, sharding  # noqa: E402


def correct_cpu_deepspeed_state() -> None:
    """On a machine without GPUs accelerate leaves its process count at 1 and every rank at index 0
    under DeepSpeed, although DeepSpeed has started a gloo world of 2 (accelerate picks no backend
    for CPU there). Set them from torch.distributed, as accelerate does itself with a GPU backend,
    before the trainer's Accelerator copies them. On GPUs this changes nothing."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return  # DDP on CPU: accelerate's own MULTI_CPU state is right (and needs cpu=True first)
    from accelerate.state import PartialState

    state = PartialState()
    if torch.distributed.is_initialized() and state.num_processes != torch.distributed.get_world_size():
        state.num_processes = torch.distributed.get_world_size()
        state.process_index = torch.distributed.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))


def select_fsdp_on_cpu() -> None:
    """accelerate selects FSDP only on GPUs (on a CPU world its state stays MULTI_CPU). Under an FSDP
    launch config, start that CPU world and switch its state to FSDP with the plugin the config
    describes, as accelerate does itself with GPUs; the trainer's Accelerator then prepares the
    policy with fully_shard. On GPUs this changes nothing."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    Accelerator(cpu=True)
    PartialState().distributed_type = AcceleratorState().distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = FullyShardedDataParallelPlugin()


def build(model_dir: str, tokenizer_dir: str, **overrides) -> PPOTrainer:
    """The scenario's trainer (SGD, the launch's backend); `overrides` and $FASTPPO_SCENARIO_SWITCHES change
    PPOConfig fields (tests/rollout/vllm_distributed_scenarios.py builds its vLLM runs here too)."""
    torch.set_num_threads(1)
    correct_cpu_deepspeed_state()
    select_fsdp_on_cpu()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    switches = json.loads(os.environ.get("FASTPPO_SCENARIO_SWITCHES", "{}"))  # extra PPOConfig fields
    settings = dict(batch_size=2, mini_batch_size=1, ppo_epochs=2, learning_rate=0.1, use_score_scaling=True,
                    max_grad_norm=None, seed=0)
    config = PPOConfig(**{**settings, **switches, **overrides})
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    return PPOTrainer(config, model, None, tokenizer, optimizer=optimizer)


def step(trainer: PPOTrainer, index: int) -> dict:
    rank = trainer.accelerator.process_index
    queries, responses, scores = make_batch(trainer.tokenizer, 2, seed=100 * index + rank)
    stats = trainer.step(queries, responses, scores)
    return {k: v for k, v in stats.items() if isinstance(v, float) and not k.startswith("time/")
            and k != "fastppo/tokens_per_s"}


def main(scenario: str, model_dir: str, tokenizer_dir: str, out_dir: str) -> None:
    trainer = build(model_dir, tokenizer_dir)
    rank = trainer.accelerator.process_index
    report = {"world_size": trainer.config.world_size, "stats": {}, "engine": type(trainer.model).__name__,
              "zero_stage": sharding.zero_stage(trainer.accelerator),
              "local_numel": sum(getattr(p, "_local_tensor", p).numel() for p in trainer.model.parameters())}
    if scenario == "run":
        queries, _, _ = make_batch(trainer.tokenizer, 2, seed=rank)
        # ranks sample different lengths: nothing may wait on the other process while sampling
        generated = trainer.generate(queries, batch_size=2, max_new_tokens=4 + 3 * rank, do_sample=False,
                                     return_prompt=False, remove_padding=False)
        report["generated"] = [t.tolist() for t in generated]
        report["stats"]["1"] = step(trainer, 1)
        trainer.save_state(os.path.join(out_dir, "state"))
        report["stats"]["2"] = step(trainer, 2)
        trainer.save_pretrained(os.path.join(out_dir, "model"))
    elif scenario == "resume":
        trainer.load_state(os.path.join(out_dir, "state"))
        report["stats"]["2"] = step(trainer, 2)
        trainer.save_pretrained(os.path.join(out_dir, "resumed"))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    with open(os.path.join(out_dir, f"rank{rank}-{scenario}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    end_process_group()
