"""PPO learns: a few dozen generate → score → step rounds on a tiny model raise a simple reward."""

import numpy as np
import torch

from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer


def test_ppo_raises_the_reward_of_a_tiny_model(gpt2_dir, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    config = PPOConfig(batch_size=16, mini_batch_size=8, ppo_epochs=4, learning_rate=3e-3, init_kl_coef=0.01,
                       seed=0)
    trainer = PPOTrainer(config, model, None, tokenizer)
    good = torch.arange(2, 34)  # 32 of the 320 token ids earn reward: about 0.1 at random

    def reward(response: torch.Tensor) -> float:
        return float(torch.isin(response, good).float().mean())

    generator = torch.Generator().manual_seed(1)
    history = []
    for _ in range(30):
        queries = [torch.randint(34, 320, (3,), generator=generator) for _ in range(16)]
        responses = trainer.generate(queries, return_prompt=False, batch_size=16, do_sample=True, top_k=0,
                                     max_new_tokens=6, min_new_tokens=6, eos_token_id=None)
        scores = [torch.tensor(reward(r)) for r in responses]
        trainer.step(queries, responses, scores)
        history.append(float(torch.stack(scores).mean()))
    start, end = np.mean(history[:5]), np.mean(history[-5:])
    assert start < 0.2
    assert end > start + 0.3, f"mean reward went from {start:.3f} to {end:.3f}: {np.round(history, 2)}"
