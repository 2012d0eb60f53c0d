"""Critic-free estimators in a step (PPOConfig.advantage_estimator): the advantages trained on, no value head
run or trained, the group checks. The estimators' own math: tests/ops/test_estimators.py."""

import numpy as np
import pytest
import torch

from conftest import make_batch, record_experience
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, reference

ESTIMATORS = ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]


def _grouped_batch(tokenizer, groups=2, size=2, seed=0):
    """`groups` queries, each repeated `size` times, with their own responses and scores."""
    queries, responses, scores = make_batch(tokenizer, groups * size, seed=seed)
    return [queries[(i // size) * size] for i in range(groups * size)], responses, scores


def _trainer(model_dir, tokenizer, **config_kwargs):
    config = PPOConfig(**{"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "learning_rate": 1e-3,
                          "init_kl_coef": 0.0, **config_kwargs})
    return PPOTrainer(config, AutoModelForCausalLMWithValueHead.from_pretrained(model_dir), None, tokenizer)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_advantages_trained_on_and_no_critic(gpt2_dir, tokenizer, monkeypatch, estimator):
    seen = record_experience(monkeypatch)
    trainer = _trainer(gpt2_dir, tokenizer, advantage_estimator=estimator, group_size=2, gamma=0.9)
    v_head = trainer.unwrapped_model.v_head
    calls = []
    v_head.register_forward_hook(lambda *args: calls.append(1))
    head_before = {k: v.clone() for k, v in v_head.state_dict().items()}
    weights_before = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    queries, responses, scores = _grouped_batch(tokenizer)
    stats = trainer.step(queries, responses, scores)

    experience = seen[0]
    mask, scores = experience.mask, torch.stack(scores)
    expected = {  # init_kl_coef 0: a response's reward is its score, at its last token
        "grpo": lambda: reference.grpo_advantages(scores, 2)[:, None] * mask,
        "rloo": lambda: reference.rloo_advantages(scores, 2)[:, None] * mask,
        "reinforce_pp": lambda: reference.reinforce_pp_advantages(
            reference.kl_penalty_rewards(experience.old_logprobs, experience.old_logprobs, mask, scores, 0.0)[0],
            mask, 0.9),
        "reinforce_pp_baseline": lambda: reference.reinforce_pp_baseline_advantages(scores, mask, 2),
    }[estimator]()
    torch.testing.assert_close(experience.advantages, expected)
    assert not experience.old_values.any() and not experience.returns.any()
    assert not calls and all(torch.equal(v, head_before[k]) for k, v in v_head.state_dict().items())
    assert not any(p.requires_grad for p in v_head.parameters())
    assert not any(k.startswith(("ppo/val/", "ppo/returns/")) for k in stats) and stats["ppo/loss/value"] == 0.0
    weights_after = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    assert not torch.equal(weights_before, weights_after) and stats["fastppo/optimizer_steps"] == 2
    assert "fastppo/groups_zero_std" in stats


def test_a_group_whose_scores_are_equal_gets_zero_advantage(gpt2_dir, tokenizer, monkeypatch):
    seen = record_experience(monkeypatch)
    trainer = _trainer(gpt2_dir, tokenizer, advantage_estimator="grpo", group_size=2)
    queries, responses, _ = _grouped_batch(tokenizer)
    stats = trainer.step(queries, responses, [torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0),
                                              torch.tensor(2.0)])
    assert stats["fastppo/groups_zero_std"] == 0.5
    advantages = seen[0].advantages
    assert torch.isfinite(advantages).all() and not advantages[:2].any() and advantages[2:].any()


def test_the_reward_kl_enters_a_responses_reward(gpt2_dir, tokenizer, monkeypatch):
    """With init_kl_coef > 0 a response's reward is its token rewards' sum: score plus the KL penalty (veRL's)."""
    seen = record_experience(monkeypatch)
    trainer = _trainer(gpt2_dir, tokenizer, advantage_estimator="rloo", group_size=2, init_kl_coef=0.2, ppo_epochs=2)
    batches = [_grouped_batch(tokenizer, seed=seed) for seed in (0, 1)]
    stats = [trainer.step(*batch) for batch in batches][1]
    experience, scores = seen[1], torch.stack(batches[1][2])
    logprobs, ref = (torch.from_numpy(np.asarray(stats[k])) for k in ("objective/logprobs", "objective/ref_logprobs"))
    rewards, _ = reference.kl_penalty_rewards(logprobs, ref, experience.mask, scores, stats["objective/kl_coef"])
    expected = reference.rloo_advantages(rewards.sum(-1), 2)[:, None] * experience.mask
    torch.testing.assert_close(experience.advantages, expected)
    plain = reference.rloo_advantages(scores, 2)[:, None] * experience.mask
    assert not torch.allclose(experience.advantages, plain)  # the policy moved at step 1: the penalty is not 0


def test_backends_agree_on_grpo(gpt2_dir, tokenizer):
    pytest.importorskip("triton")
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        trainer = _trainer(gpt2_dir, tokenizer, advantage_estimator="grpo", group_size=2, backend=backend,
                           kl_loss_coef=0.1)
        stats = [trainer.step(*_grouped_batch(tokenizer, seed=seed)) for seed in (0, 1)]
        results.append((stats, torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])))
    for key, value in results[0][0][1].items():
        if not key.startswith("time/") and key != "fastppo/tokens_per_s":
            np.testing.assert_allclose(np.asarray(results[1][0][1][key], np.float64), np.asarray(value, np.float64),
                                       rtol=2e-4, atol=2e-5, err_msg=key)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-4, atol=1e-4)


def test_a_group_must_share_its_query(gpt2_dir, tokenizer):
    trainer = _trainer(gpt2_dir, tokenizer, advantage_estimator="grpo", group_size=2)
    queries, responses, scores = _grouped_batch(tokenizer)
    before = torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()])
    other = queries[3].clone()
    other[0] = (other[0] + 1) % len(tokenizer)  # same length, one token differs
    with pytest.raises(ValueError, match=r"queries\[3\] differs from queries\[2\]"):
        trainer.step(queries[:3] + [other], responses, scores)
    with pytest.raises(ValueError, match=r"queries\[1\] differs from queries\[0\]"):
        trainer.step([queries[0], torch.cat([queries[0], queries[0]])] + queries[2:], responses, scores)
    assert torch.equal(before, torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(advantage_estimator="grpo"), "group_size >= 2"),
    (dict(advantage_estimator="rloo", group_size=1), "group_size >= 2"),
    (dict(group_size=3), "whole number of groups"),
    (dict(advantage_estimator="ppo"), "PPOConfig.advantage_estimator"),
    (dict(scale_rewards="token"), "PPOConfig.scale_rewards"),
])
def test_bad_estimator_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(batch_size=4, mini_batch_size=2, **kwargs)


def test_a_plain_causal_lm_trains_and_saves_as_itself(gpt2_dir, tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, advantage_estimator="grpo",
                                   group_size=2), lm, None, tokenizer)
    assert trainer.unwrapped_model.pretrained_model is lm and trainer.unwrapped_model.v_head is None
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    stats = trainer.step(*_grouped_batch(tokenizer))
    assert stats["fastppo/optimizer_steps"] == 2
    assert any(not torch.equal(before[k], v) for k, v in lm.state_dict().items())
    responses = trainer.generate([torch.tensor([5, 6, 7])], max_new_tokens=3, do_sample=False)
    assert len(responses) == 1
    trainer.save_pretrained(tmp_path)
    assert not any(key.startswith("v_head") for key in load_file(tmp_path / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, lm.state_dict()[key], rtol=0, atol=0)


def test_a_plain_causal_lm_needs_a_critic_free_estimator(gpt2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="without a value head"):
        PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), AutoModelForCausalLM.from_pretrained(gpt2_dir), None,
                   tokenizer)


def test_a_peft_plain_causal_lm_saves_its_adapter_only(gpt2_dir, tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    lm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_dir),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, advantage_estimator="rloo",
                                   group_size=2, kl_loss_coef=0.1), lm, None, tokenizer)
    stats = trainer.step(*_grouped_batch(tokenizer))
    assert stats["fastppo/loss/kl"] == 0.0  # one mini-batch; the reference is the adapter disabled, LoRA's B = 0
    trainer.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and not (tmp_path / "pytorch_model.bin").exists()
