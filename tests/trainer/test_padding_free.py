"""padding_free=True (packed forward passes) and max_tokens_per_microbatch (rollout grouped by tokens)
train exactly as padded batches do; a model that attends across packed sequences is refused."""

import numpy as np
import pytest
import torch

from conftest import assert_same_training, make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from fastppo.models import varlen_attention
from fastppo.training import packing
from fastppo.training.forward_plan import ForwardPlan

SGD_WEIGHTS = dict(atol=1e-5, rtol=1e-4)  # SGD: float noise stays float noise in the weights
# packed passes need transformers' attention registry (transformers 5; not 4.46, scripts/test_oldest.sh)
needs_packing = pytest.mark.skipif(not varlen_attention.AVAILABLE,
                                   reason=f"no packed passes: {varlen_attention.UNAVAILABLE}")


def _train(model_dir, tokenizer, steps=2, model_kwargs=None, **config_kwargs):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir, **(model_kwargs or {}))
    settings = dict(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2, learning_rate=0.1)
    settings.update(config_kwargs)
    config = PPOConfig(**settings)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    trainer = PPOTrainer(config, model, None, tokenizer, optimizer=optimizer)
    results = []
    for seed in range(steps):  # ragged: queries of 2–6 tokens, responses of 1–24
        queries, responses, scores = make_batch(tokenizer, 8, seed=seed, max_response=24)
        mask = trainer._pad_batch(queries, responses, None).mask
        results.append((trainer.step(queries, responses, scores), mask.cpu().numpy().astype(bool)))
    return trainer, results


def _assert_same_training(baseline, candidate):
    assert_same_training(baseline, candidate, SGD_WEIGHTS)


@needs_packing
@pytest.mark.parametrize("head", ["full", "response", "fused"])
def test_padding_free_trains_the_same(model_dir, tokenizer, head, monkeypatch):
    switches = {"fused": {"fused_lm_head": True}, "response": {"response_only_logits": True}}.get(head, {})
    baseline = _train(model_dir, tokenizer, **switches)
    seen = []  # what the model was fed: one packed row per pass, no pad token
    pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda *args, **kwargs: seen.append(pack(*args, **kwargs)) or seen[-1])
    candidate = _train(model_dir, tokenizer, padding_free=True, **switches)
    # the construction's packing check of policy and reference, then 2 steps × (4 rollout passes of
    # mini_batch_size rows + 2 epochs × 4 mini-batches)
    assert len(seen) == 2 + 24 and all(p.input_ids.shape[0] == 1 and (p.input_ids != 0).all() for p in seen)
    _assert_same_training(baseline, candidate)


@needs_packing
def test_padding_free_with_full_kl_and_gradient_checkpointing(gpt2_dir, tokenizer):
    switches = dict(kl_penalty="full", whiten_rewards=True, gradient_checkpointing=True)
    baseline = _train(gpt2_dir, tokenizer, **switches)
    _assert_same_training(baseline, _train(gpt2_dir, tokenizer, padding_free=True, **switches))


@needs_packing
def test_padding_free_with_a_lora_policy(model_dirs, tokenizer):
    llama_dir = model_dirs["llama"]
    peft = pytest.importorskip("peft")
    lora = {"peft_config": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM")}
    baseline = _train(llama_dir, tokenizer, steps=1, model_kwargs=lora)
    _assert_same_training(baseline, _train(llama_dir, tokenizer, steps=1, model_kwargs=lora, padding_free=True))


@pytest.mark.parametrize("padding_free", [False, pytest.param(True, marks=needs_packing)])
@pytest.mark.parametrize("ratio_threshold", [10.0, 1.0000001], ids=["guard-idle", "guard-skips"])
def test_token_budget_micro_batches_change_nothing(gpt2_dir, tokenizer, padding_free, ratio_threshold, monkeypatch):
    """Rollout passes and each mini-batch split by a 40-token budget: the same stats and weights, TRL's
    ratio guard included (a tiny threshold makes it skip mini-batches, decided on the whole mini-batch)."""
    switches = dict(padding_free=padding_free, ratio_threshold=ratio_threshold)
    baseline = _train(gpt2_dir, tokenizer, **switches)
    fed = []  # tokens of every training/rollout forward pass
    forward = ForwardPlan.forward

    def recording(self, model, batch, return_entropy=False, keep_logits=False):
        fed.append((batch.input_ids.numel(), batch.rows))  # packed: one row of the real tokens
        return forward(self, model, batch, return_entropy, keep_logits)

    monkeypatch.setattr(ForwardPlan, "forward", recording)
    budgeted = _train(gpt2_dir, tokenizer, max_tokens_per_microbatch=40, **switches)
    assert all(tokens <= 40 or rows == 1 for tokens, rows in fed)  # a longer row goes alone
    assert any(rows == 1 for _, rows in fed)  # mini-batches of 2 rows were split
    if ratio_threshold < 2:
        assert any(stats["fastppo/skipped_minibatches"] > 0 for stats, _ in budgeted[1])
    _assert_same_training(baseline, budgeted)


@needs_packing
def test_token_budget_groups_rows_in_order_and_a_long_row_alone(gpt2_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    config = PPOConfig(batch_size=4, mini_batch_size=2, padding_free=True, max_tokens_per_microbatch=30)
    trainer = PPOTrainer(config, model, None, tokenizer)
    lengths = [10, 15, 60, 12]  # 10 + 15 fit; 60 is over the budget on its own; 12 starts afresh
    attention_mask = torch.zeros(4, 60, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    assert trainer.forward_plan.rollout_slices(attention_mask) == [slice(0, 2), slice(2, 3), slice(3, 4)]
    trainer.forward_plan.padding_free = False  # padded rows each cost the batch's width (60): one row per pass
    assert trainer.forward_plan.rollout_slices(attention_mask) == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)]


def test_pack_and_unpack_place_every_position():
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    attention_mask = (input_ids != 0).long()
    attention_mask[2] = 1
    mask = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 1]])
    packed = packing.pack(input_ids, attention_mask, mask)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # packed position p predicts token p+1: 7→8 and 9→1 cross a boundary and are never in the mask
    assert packed.mask.tolist() == [[0, 1, 0, 1, 0, 0, 0, 1]]
    values = torch.arange(1.0, 9.0)[None]  # one value per packed position
    assert packing.unpack(values, packed).tolist() == [[1, 2, 0], [4, 0, 0], [6, 7, 8]]


def test_a_model_that_attends_across_packed_sequences_is_refused(gpt2_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    forward = model.backbone.forward  # (which every forward of the trainer reaches, with or without the LM head)

    def ignoring_positions(*args, position_ids=None, **kwargs):  # as a model without packed-sequence support
        return forward(*args, **kwargs)

    model.backbone.forward = ignoring_positions
    with pytest.raises(ValueError, match="padding_free.*attends across packed sequences"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=1, padding_free=True), model, None, tokenizer)
    PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=1), model, None, tokenizer)  # padded batches stay fine


@pytest.mark.skipif(varlen_attention.AVAILABLE, reason="this transformers packs: see the tests above")
def test_padding_free_is_refused_where_transformers_cannot_pack(model_dir, tokenizer):
    """transformers 4.46: no attention registry, and SDPA/eager attend across packed sequences: the trainer says so
    when it is built, and padded batches still train."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="attends across packed sequences.*attention registry.*set padding_free=False"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=1, padding_free=True), model, None, tokenizer)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=1), model, None, tokenizer)
    trainer.step(*make_batch(tokenizer, 2))
    assert trainer.forward_plan.packed_attention["the policy"].startswith("transformers:")


def test_bad_budget_and_switch_values_are_refused():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
            PPOConfig(max_tokens_per_microbatch=bad)
    with pytest.raises(ValueError, match="padding_free"):
        PPOConfig(padding_free="yes")


@needs_packing
def test_padding_free_under_bf16_mixed_precision(gpt2_dir, tokenizer, fresh_accelerator_state):
    switches = dict(steps=1, fused_lm_head=True, accelerator_kwargs={"mixed_precision": "bf16"})
    baseline = _train(gpt2_dir, tokenizer, **switches)
    trainer, results = _train(gpt2_dir, tokenizer, padding_free=True, **switches)
    assert trainer.accelerator.mixed_precision == "bf16"
    (expected, mask), (got, _) = baseline[1][0], results[0]
    assert (got["objective/logprobs"][mask] <= 0).all()
    for key in ("ppo/loss/total", "ppo/loss/value", "ppo/policy/entropy", "ppo/val/mean", "objective/entropy"):
        assert np.isfinite(got[key]) and got[key] == pytest.approx(expected[key], rel=3e-2, abs=3e-3), key


def test_pass_counts_even_out_by_halving_the_widest_slices():
    from fastppo.training import microbatch

    assert microbatch.token_budget_slices([5, 5, 30, 4, 4, 4], budget=12) == [slice(0, 2), slice(2, 3), slice(3, 6)]
    evened = microbatch.split_to_count([slice(0, 2), slice(2, 3), slice(3, 6)], 5)
    assert evened == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4), slice(4, 6)]
    assert microbatch.split_to_count([slice(0, 1), slice(1, 2)], 4) == [slice(0, 1), slice(1, 2)]  # rows run out
