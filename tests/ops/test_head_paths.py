"""Memory-lean paths of step(): response-only logits, fused LM head, gradient checkpointing,
micro-batched rollout. Each must give the same training as the default (TRL) path."""

import numpy as np
import pytest
import torch

from conftest import assert_same_training, make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from tolerances import WEIGHTS


def _train(model_dir, tokenizer, **config_kwargs):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, **config_kwargs)
    trainer = PPOTrainer(config, model, None, tokenizer)
    results = []
    for seed in (0, 1):
        queries, responses, scores = make_batch(tokenizer, 4, seed=seed)
        mask = trainer._pad_batch(queries, responses, None).mask
        results.append((trainer.step(queries, responses, scores), mask.cpu().numpy().astype(bool)))
    return trainer, results


def _assert_same_training(baseline, candidate):
    assert_same_training(baseline, candidate, WEIGHTS)


@pytest.mark.parametrize("kl_penalty", ["kl", "full"])
def test_response_only_logits_trains_the_same(model_dir, tokenizer, kl_penalty):
    baseline = _train(model_dir, tokenizer, kl_penalty=kl_penalty)
    _assert_same_training(baseline, _train(model_dir, tokenizer, kl_penalty=kl_penalty, response_only_logits=True))


def test_fused_lm_head_trains_the_same(model_dir, tokenizer):
    baseline = _train(model_dir, tokenizer)
    _assert_same_training(baseline, _train(model_dir, tokenizer, fused_lm_head=True))


def test_gradient_checkpointing_trains_the_same_and_recomputes(gpt2_dir, tokenizer, monkeypatch):
    calls = {"count": 0}
    build = AutoModelForCausalLMWithValueHead.from_pretrained

    def counting(*args, **kwargs):  # count the first attention forwards; recomputation runs it again
        model = build(*args, **kwargs)
        model.pretrained_model.transformer.h[0].attn.register_forward_hook(lambda *_: calls.update(count=calls["count"] + 1))
        return model

    monkeypatch.setattr(AutoModelForCausalLMWithValueHead, "from_pretrained", counting)
    baseline = _train(gpt2_dir, tokenizer)
    plain_calls, calls["count"] = calls["count"], 0
    candidate = _train(gpt2_dir, tokenizer, gradient_checkpointing=True)
    # 2 steps × 2 epochs × 2 mini-batches = 8 training forwards, each recomputed once in backward
    assert calls["count"] == plain_calls + 8
    _assert_same_training(baseline, candidate)


def test_rollout_batch_size_changes_nothing(gpt2_dir, tokenizer):
    _assert_same_training(_train(gpt2_dir, tokenizer), _train(gpt2_dir, tokenizer, rollout_batch_size=1))


def test_fused_head_with_full_kl_is_rejected():
    with pytest.raises(ValueError, match="fused_lm_head"):
        PPOConfig(fused_lm_head=True, kl_penalty="full")


def test_models_with_logit_transforms_are_rejected(gpt2_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    model.pretrained_model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, response_only_logits=True), model, None, tokenizer)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_step_never_allocates_n_by_v(gpt2_dir, tokenizer, monkeypatch, backend):
    """Whole step (rollout, reference, training forward and backward) without any [N, V] tensor."""
    from kernel_utils import LargeAllocations

    import fastppo.kernels._launch as launch

    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setattr(launch, "linear_logprobs_chunk_size", lambda n, v, device: 4)
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randint(2, 320, (2,), generator=generator) for _ in range(4)]
    responses = [torch.randint(2, 320, (20,), generator=generator) for _ in range(4)]
    scores = [torch.tensor(1.0)] * 4
    n_by_v = 4 * 21 * 320  # [B, L-1, V] logits of the default path

    def largest(**config_kwargs):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
        config = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, backend=backend, **config_kwargs)
        trainer = PPOTrainer(config, model, None, tokenizer)
        trainer.step(queries, responses, scores)  # Adam state exists before recording
        with LargeAllocations(n_by_v // 2) as recorder:
            trainer.step(queries, responses, scores)
        return recorder.found

    assert largest(), "the default path allocates [N, V] logits; the recorder must see them"
    assert largest(fused_lm_head=True) == []


def test_bf16_mixed_precision_through_accelerate(gpt2_dir, tokenizer, fresh_accelerator_state):
    trainer, results = _train(gpt2_dir, tokenizer, fused_lm_head=True, gradient_checkpointing=True,
                              accelerator_kwargs={"mixed_precision": "bf16"})
    assert trainer.accelerator.mixed_precision == "bf16"
    for stats, _ in results:
        assert np.isfinite(stats["ppo/loss/total"]) and (stats["objective/logprobs"] <= 0).all()
    assert trainer.unwrapped_model.v_head.summary.weight.dtype == torch.float32  # master weights stay fp32
