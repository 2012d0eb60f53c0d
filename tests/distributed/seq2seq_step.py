"""Run by tests/distributed/test_distributed.py under `accelerate launch` (2 CPU processes, gloo): an encoder-decoder
policy (the tiny T5 of tests/data/trl_seq2seq) steps on each rank's own data, whose encoder and decoder rows have
different widths on the two ranks; each rank writes its weight checksum and stats.
Usage: accelerate launch ... tests/distributed/seq2seq_step.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
from conftest import end_process_group  # noqa: E402
from fastppo import AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402

DATA = Path(__file__).parents[1] / "data"


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(DATA / "trl_parity" / "tokenizer")
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(DATA / "trl_seq2seq" / "init")
    config = PPOConfig(batch_size=2, mini_batch_size=1, ppo_epochs=2, learning_rate=1e-3,
                       accelerator_kwargs={"cpu": True})
    trainer = PPOTrainer(config, model, None, tokenizer)
    rank = trainer.accelerator.process_index
    generator = torch.Generator().manual_seed(rank)
    queries = [torch.randint(2, 64, (n,), generator=generator) for n in (3 + 4 * rank, 2)]
    responses = [torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(2, 64, (n,), generator=generator)])
                 for n in (2 + 5 * rank, 3)]
    stats = trainer.step(queries, responses, [torch.tensor(1.0 - rank), torch.tensor(0.5)])
    weights = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    report = {"world_size": trainer.accelerator.num_processes, "weights_sum": float(weights.double().sum()),
              "weights_abs_sum": float(weights.double().abs().sum()), "loss": stats["ppo/loss/total"],
              "optimizer_steps": stats["fastppo/optimizer_steps"]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()
