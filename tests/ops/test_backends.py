"""The trainer gives the same results on the Triton backend as on the PyTorch reference.

Without a GPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET).
"""

import numpy as np
import pytest
import torch

from conftest import make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, ops
from tolerances import TRAINER, WEIGHTS

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _train(model_dir, tokenizer, backend, **config_kwargs):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config_kwargs.setdefault("learning_rate", 1e-3)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, backend=backend, **config_kwargs)
    trainer = PPOTrainer(config, model, None, tokenizer)
    stats = [trainer.step(*make_batch(tokenizer, 4, seed=seed)) for seed in (0, 1)]
    return trainer, stats


@pytest.mark.parametrize("config_kwargs", [
    dict(),
    dict(kl_penalty="full", whiten_rewards=True),
    dict(kl_penalty="k3", gamma=0.9, lam=0.8, max_grad_norm=0.5),
    dict(dual_clip=1.01, learning_rate=3e-3),  # a larger step: second-epoch ratios pass 1.01
    dict(cliprange_low=0.01, cliprange_high=0.03, learning_rate=3e-3),  # clip-higher, both bounds reached
    dict(kl_loss_coef=0.5, init_kl_coef=0.0),  # GRPO's KL loss instead of the reward KL
], ids=["default", "full-whiten", "k3-clip", "dual-clip", "clip-higher", "kl-loss"])
def test_trainer_matches_between_backends(gpt2_dir, tokenizer, config_kwargs):
    assert ops.resolve_backend("triton", DEVICE) == "triton"  # the trainer's device: a GPU when there is one
    torch_trainer, torch_stats = _train(gpt2_dir, tokenizer, "torch", **config_kwargs)
    triton_trainer, triton_stats = _train(gpt2_dir, tokenizer, "triton", **config_kwargs)
    for expected, got in zip(torch_stats, triton_stats):
        for key, value in expected.items():
            if key.startswith("time/") or key == "fastppo/tokens_per_s":
                continue
            np.testing.assert_allclose(np.asarray(got[key], dtype=np.float64), np.asarray(value, dtype=np.float64),
                                       err_msg=key, **TRAINER)
    if "dual_clip" in config_kwargs:  # the switch was exercised, not just accepted
        assert max(stats["fastppo/policy/clipfrac_lower"] for stats in torch_stats) > 0
    if "cliprange_high" in config_kwargs:
        assert max(stats["ppo/policy/clipfrac"] for stats in torch_stats) > 0
    expected_state = torch_trainer.unwrapped_model.state_dict()
    for key, value in triton_trainer.unwrapped_model.state_dict().items():
        torch.testing.assert_close(value, expected_state[key], msg=lambda m: f"{key}: {m}", **WEIGHTS)


def test_auto_uses_triton_where_it_runs(monkeypatch):
    """CPU tensors under the interpreter (CI), CUDA tensors on a GPU: "auto" reaches the kernel every call."""
    monkeypatch.delenv("FASTPPO_BACKEND", raising=False)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_backend("auto", DEVICE) == "triton"
    calls = []
    import fastppo.kernels.gae as gae_module

    original = gae_module.gae
    monkeypatch.setattr(gae_module, "gae", lambda *args: calls.append(1) or original(*args))
    rewards = torch.randn(2, 5, device=DEVICE)
    values, mask = torch.zeros_like(rewards), torch.ones_like(rewards)
    ops.gae(rewards, values, mask, 1.0, 0.9)
    ops.gae(rewards, values, mask, 1.0, 0.9)
    assert len(calls) == 2  # every call reaches the kernel, not only the first


@pytest.mark.parametrize("response_only_logits", [False, True], ids=["full", "response"])
def test_training_backward_writes_the_logits_gradient_in_place(gpt2_dir, tokenizer, monkeypatch,
                                                               response_only_logits):
    """The training forward asks the logprobs kernel to reuse the LM head's logits for their gradient
    (one [b, L-1, V] buffer less); results equal the torch backend's (test above)."""
    import fastppo.kernels.logprobs as module

    calls, real = [], module.logprobs_from_logits

    def spy(logits, labels, **kwargs):
        calls.append((kwargs["inplace_backward"], torch.is_grad_enabled()))
        out = real(logits, labels, **kwargs)
        if torch.is_grad_enabled():  # the gradient the LM head receives is the logits' own memory
            logits.register_hook(lambda grad: grads.append(grad.data_ptr() == logits.data_ptr()))
        return out

    grads = []
    monkeypatch.setattr(module, "logprobs_from_logits", spy)
    _train(gpt2_dir, tokenizer, "triton", response_only_logits=response_only_logits)
    assert (True, True) in calls and grads and all(grads)
