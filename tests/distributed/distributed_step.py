"""Run by tests/distributed/test_distributed.py under `accelerate launch` (2 CPU processes, gloo).

Each rank trains on its own data for two steps and writes its stats and a weight checksum; rank 1 poisons one
mini-batch with NaN values, which every rank's non-finite guard must skip alike.
Usage: accelerate launch ... tests/distributed_step.py MODEL_DIR TOKENIZER_DIR OUT_DIR
"""

import json
import os
import sys

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import end_process_group, make_batch  # noqa: E402
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402


def main(model_dir: str, tokenizer_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config = PPOConfig(batch_size=2, mini_batch_size=1, ppo_epochs=2, learning_rate=1e-3, use_score_scaling=True,
                       accelerator_kwargs={"cpu": True})
    trainer = PPOTrainer(config, model, None, tokenizer)
    rank = trainer.accelerator.process_index
    if rank == 1:  # NaN values in this rank's 6th training forward (step 2, 2nd mini-batch): every rank must skip it
        calls = {"n": 0}

        def poison(module, args, output):
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == 6:
                    return output + float("nan")
            return output

        trainer.unwrapped_model.v_head.register_forward_hook(poison)
    results = []
    for step in range(2):
        queries, responses, scores = make_batch(tokenizer, 2, seed=100 * step + rank)  # different data per rank
        stats = trainer.step(queries, responses, scores)
        results.append({k: v for k, v in stats.items() if isinstance(v, float) and not k.startswith("time/")
                        and k != "fastppo/tokens_per_s"})
    weights = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    report = {"finite": bool(torch.isfinite(weights).all()), "world_size": trainer.accelerator.num_processes, "stats": results,
              "weights_sum": float(weights.double().sum()), "weights_abs_sum": float(weights.double().abs().sum()),
              "kl_coef": trainer.kl_ctl.value, "running_mean": trainer.running.mean}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    end_process_group()
