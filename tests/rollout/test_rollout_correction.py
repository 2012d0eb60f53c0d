"""step(..., rollout_logprobs=...): the training-vs-rollout mismatch stats, and the "tis" correction."""

import math

import numpy as np
import pytest
import torch

from conftest import make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from tolerances import TRAINER, WEIGHTS

QUERIES = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([10, 11]), torch.tensor([12, 13, 14, 15])]
SCORES = [torch.tensor(s) for s in (1.0, -0.5, 0.25, 2.0)]


def make_trainer(model_dir, tokenizer, **config):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    settings = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3)
    settings.update(config)
    return PPOTrainer(PPOConfig(**settings), model, None, tokenizer)


def sampled(trainer):
    """Responses and the engine's (HF's) log-probs of them, from the untrained policy."""
    torch.manual_seed(1)
    return trainer.generate(QUERIES, return_prompt=False, return_logprobs=True, do_sample=True, top_k=0,
                            max_new_tokens=6, eos_token_id=None)


def numeric(stats, key):
    return np.asarray(stats[key], dtype=np.float64)


def test_rollout_logprobs_without_correction_only_add_stats(gpt2_dir, tokenizer):
    plain = make_trainer(gpt2_dir, tokenizer)  # each trainer re-seeds the global RNGs: build, then step
    responses, logprobs = sampled(plain)
    expected = plain.step(QUERIES, responses, SCORES)
    given = make_trainer(gpt2_dir, tokenizer)
    got = given.step(QUERIES, responses, SCORES, rollout_logprobs=logprobs)
    assert set(got) - set(expected) == {"rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/kl"}
    for key, value in expected.items():
        if not key.startswith("time/") and key != "fastppo/tokens_per_s":
            np.testing.assert_array_equal(numeric(got, key), numeric(expected, key), err_msg=key)
    expected_state = plain.unwrapped_model.state_dict()
    for name, tensor in given.unwrapped_model.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), name  # bit for bit


def test_mismatch_stats_by_hand(model_dir, tokenizer):
    trainer = make_trainer(model_dir, tokenizer)
    responses, logprobs = sampled(trainer)
    shifted = [lp - 0.1 for lp in logprobs]  # as if the engine gave every token 0.1 nats less
    stats = trainer.step(QUERIES, responses, SCORES, rollout_logprobs=shifted)
    # left-padded generate vs step's right-padded forward: equal to ~1e-6
    assert stats["rollout/logprob_diff_mean"] == pytest.approx(0.1, abs=1e-5)
    assert stats["rollout/logprob_diff_max"] == pytest.approx(0.1, abs=1e-5)
    assert stats["rollout/kl"] == pytest.approx(math.exp(0.1) - 1 - 0.1, abs=1e-5)  # k3 at log r = 0.1
    in_sync = make_trainer(model_dir, tokenizer).step(QUERIES, responses, SCORES, rollout_logprobs=logprobs)
    assert in_sync["rollout/logprob_diff_max"] <= 1e-5 and 0 <= in_sync["rollout/kl"] <= 1e-10


def test_mismatch_stats_count_only_trained_tokens(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    responses, logprobs = sampled(trainer)
    masks = [torch.ones_like(r) for r in responses]
    masks[0][1:] = 0
    off = [lp.clone() for lp in logprobs]
    off[0][1:] -= 5.0  # way off, but masked out of training
    stats = trainer.step(QUERIES, responses, SCORES, response_masks=masks, rollout_logprobs=off)
    assert stats["rollout/logprob_diff_max"] <= 1e-5


class GradientRecorder(torch.optim.SGD):
    """SGD with lr 0 that keeps the gradients it was handed: the update a loss asks for, without rounding."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([None if p.grad is None else p.grad.clone() for p in self.param_groups[0]["params"]])


@pytest.mark.parametrize("shift, weight, clipfrac", [(1.0, math.exp(-1.0), 0.0), (-1.0, 2.0, 1.0)],
                         ids=["below-one", "capped"])
def test_tis_weight_scales_the_policy_gradient(gpt2_dir, tokenizer, shift, weight, clipfrac):
    """Every token's weight is min(exp(old − rollout), 2) = exp(−shift) or the cap; with one mini-batch and no
    value loss, every parameter's gradient is that weight times the uncorrected one."""
    def gradients(rollout_logprobs=None, **config):
        torch.manual_seed(0)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
        recorder = GradientRecorder([p for p in model.parameters() if p.requires_grad])
        config = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, vf_coef=0.0, **config)
        stats = PPOTrainer(config, model, None, tokenizer, optimizer=recorder).step(
            QUERIES, responses, SCORES, rollout_logprobs=rollout_logprobs)
        (grads,) = recorder.grads
        return stats, grads

    responses, logprobs = sampled(make_trainer(gpt2_dir, tokenizer))
    _, expected = gradients()
    stats, got = gradients([lp + shift for lp in logprobs], rollout_correction="tis")
    assert stats["fastppo/policy/tis_weight_mean"] == pytest.approx(weight, rel=1e-5)
    assert stats["fastppo/policy/tis_clipfrac"] == clipfrac
    pairs = [(g, e) for g, e in zip(got, expected) if e is not None and float(e.abs().max()) > 0]
    assert len(pairs) > 10
    for g, e in pairs:
        torch.testing.assert_close(g, weight * e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))  # sums near 0 cancel


def test_tis_needs_rollout_logprobs_and_changes_nothing_without(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer, rollout_correction="tis")
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    with pytest.raises(ValueError, match="rollout_logprobs"):
        trainer.step(*make_batch(tokenizer, 4))
    assert all(torch.equal(v, before[k]) for k, v in trainer.unwrapped_model.state_dict().items())
    assert trainer.kl_ctl.value == 0.2 and not trainer.optimizer.state


def test_tis_matches_between_backends(gpt2_dir, tokenizer):
    pytest.importorskip("triton")
    results = {}
    for backend in ("torch", "triton"):
        trainer = make_trainer(gpt2_dir, tokenizer, backend=backend, rollout_correction="tis", rollout_is_cap=1.5,
                               learning_rate=3e-3)
        responses, logprobs = sampled(trainer)
        noisy = [lp + 0.4 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(i))
                 for i, lp in enumerate(logprobs)]  # some tokens capped, some below one
        noisy = [torch.clamp(lp, max=0.0) for lp in noisy]
        stats = [trainer.step(QUERIES, responses, SCORES, rollout_logprobs=noisy) for _ in range(2)]
        results[backend] = (stats, trainer.unwrapped_model.state_dict())
    (torch_stats, torch_state), (triton_stats, triton_state) = results["torch"], results["triton"]
    assert 0 < torch_stats[0]["fastppo/policy/tis_clipfrac"] < 1  # both sides of the cap exercised
    for expected, got in zip(torch_stats, triton_stats):
        for key, value in expected.items():
            if not key.startswith("time/") and key != "fastppo/tokens_per_s":
                np.testing.assert_allclose(numeric(got, key), numeric(expected, key), err_msg=key, **TRAINER)
    for name, tensor in triton_state.items():
        torch.testing.assert_close(tensor, torch_state[name], msg=lambda m: f"{name}: {m}", **WEIGHTS)
