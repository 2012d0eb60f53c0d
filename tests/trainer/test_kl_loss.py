"""GRPO's KL term in the loss (PPOConfig.kl_loss_coef / kl_loss_type) and the run without a reference model."""

import math
import warnings

import numpy as np
import pytest
import torch

import fastppo.trainer
from conftest import make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, reference


def test_kl_loss_terms_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(reference.kl_loss_terms(logprobs, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(reference.kl_loss_terms(logprobs, ref, "k2"), torch.tensor([[0.125, 0.5]]))
    k3 = reference.kl_loss_terms(logprobs, ref, "k3")  # r = ref − logp = −0.5, 1: e^r − r − 1
    torch.testing.assert_close(k3, torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0]]))
    k3.sum().backward()  # d/dlogp (e^r − r − 1) = 1 − e^r
    torch.testing.assert_close(logprobs.grad, torch.tensor([[1 - math.exp(-0.5), 1 - math.e]]))
    far = reference.kl_loss_terms(torch.tensor([-200.0]), torch.tensor([0.0]), "k3")  # r = 200, clamped to 20
    assert torch.isfinite(far).all() and far.item() == pytest.approx(math.exp(20) - 21, rel=1e-6)
    with pytest.raises(ValueError, match="kl_type"):
        reference.kl_loss_terms(logprobs, ref, "kl")


def _trainer(model_dir, tokenizer, ref=True, **config_kwargs):
    config = PPOConfig(**{"batch_size": 4, "mini_batch_size": 2, "learning_rate": 1e-3, **config_kwargs})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir) if ref else None
    return PPOTrainer(config, model, ref_model, tokenizer)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_the_kl_loss_is_the_masked_mean_of_the_rollouts_kl(gpt2_dir, tokenizer, kl_type):
    """One mini-batch, one epoch: the training forward sees the rollout's weights, so the reported KL loss is the
    masked mean of the chosen estimator between the step's policy and reference log-probs (0 at step 1)."""
    trainer = _trainer(gpt2_dir, tokenizer, mini_batch_size=4, ppo_epochs=1, kl_loss_coef=0.5, kl_loss_type=kl_type)
    first = trainer.step(*make_batch(tokenizer, 4, seed=0))
    assert first["fastppo/loss/kl"] == 0.0  # the policy is still the reference
    batch = make_batch(tokenizer, 4, seed=1)
    stats = trainer.step(*batch)
    mask = trainer._pad_batch(batch[0], batch[1], None).mask
    logprobs, ref = (torch.from_numpy(np.asarray(stats[k])) for k in ("objective/logprobs", "objective/ref_logprobs"))
    expected = reference.masked_mean(reference.kl_loss_terms(logprobs, ref, kl_type), mask)
    assert stats["fastppo/loss/kl"] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert kl_type == "k1" or stats["fastppo/loss/kl"] > 0


def test_the_kl_loss_moves_the_weights(gpt2_dir, tokenizer):
    """The KL term has a gradient: with it, the same steps end at other weights than without it."""
    results = []
    for coef in (0.0, 1.0):
        trainer = _trainer(gpt2_dir, tokenizer, kl_loss_coef=coef, kl_loss_type="k1")
        for seed in (0, 1):
            stats = trainer.step(*make_batch(tokenizer, 4, seed=seed))
        assert ("fastppo/loss/kl" in stats) == (coef > 0)
        results.append(torch.cat([p.detach().flatten() for p in trainer.unwrapped_model.parameters()]))
    assert not torch.allclose(results[0], results[1])


def test_without_any_kl_no_reference_is_built_or_run(gpt2_dir, tokenizer, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a reference copy was made")

    monkeypatch.setattr(fastppo.trainer, "create_reference_model", refuse)
    trainer = _trainer(gpt2_dir, tokenizer, ref=False, init_kl_coef=0.0)
    assert trainer.ref_model is None and not trainer.config.needs_reference
    stats = trainer.step(*make_batch(tokenizer, 4))
    assert stats["objective/kl"] == 0.0 and stats["fastppo/optimizer_steps"] == 8
    np.testing.assert_array_equal(stats["objective/logprobs"], stats["objective/ref_logprobs"])
    with pytest.raises(ValueError, match="generate_ref_response"):
        trainer.generate([torch.tensor([5, 6])], generate_ref_response=True, max_new_tokens=2)


def test_a_reference_given_without_any_kl_warns_and_never_runs(gpt2_dir, tokenizer):
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    calls = []
    ref_model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.warns(UserWarning, match="ref_model given is not used"):
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, init_kl_coef=0.0),
                             AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir), ref_model, tokenizer)
    trainer.step(*make_batch(tokenizer, 4))
    assert trainer.ref_model is None and not calls


def test_a_kl_loss_alone_still_builds_the_reference(gpt2_dir, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing about an unused reference
        warnings.filterwarnings("ignore", "PPOTrainer has no dataset")
        trainer = _trainer(gpt2_dir, tokenizer, ref=False, init_kl_coef=0.0, kl_loss_coef=0.1)
    assert trainer.ref_model is not None and trainer.config.needs_reference
    assert "fastppo/loss/kl" in trainer.step(*make_batch(tokenizer, 4))


def test_bad_kl_loss_settings_are_refused():
    with pytest.raises(ValueError, match="PPOConfig.kl_loss_coef"):
        PPOConfig(kl_loss_coef=-0.1)
    with pytest.raises(ValueError, match="PPOConfig.kl_loss_type"):
        PPOConfig(kl_loss_type="low_var_kl")
