"""The objectives beyond TRL's in a full `step` (PPOConfig.loss_aggregation, importance_sampling_level, clip-higher,
the KL loss, TIS) with every advantage estimator: with plain SGD the weights move by exactly −lr × the float64
gradient of the documented loss, written out again here from the step's own advantages and old log-probs; and the
ways a mini-batch can be split (gradient accumulation, token-budget micro-batches, packed passes) train as the
unsplit one under every aggregation."""

import copy
import dataclasses

import pytest
import torch

from conftest import assert_same_training, make_batch, record_experience
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from fastppo.models import varlen_attention

LR, EPOCHS = 0.5, 2
AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
SGD_WEIGHTS = dict(atol=1e-5, rtol=1e-4)


def _grouped_batch(tokenizer, rows=4, size=2, seed=0, max_response=7):
    queries, responses, scores = make_batch(tokenizer, rows, seed=seed, max_response=max_response)
    return [queries[(i // size) * size] for i in range(rows)], responses, scores


def _sgd_trainer(model_dir, tokenizer, **config_kwargs):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config = PPOConfig(**{"batch_size": 4, "mini_batch_size": 4, "ppo_epochs": EPOCHS, "learning_rate": LR,
                          "init_kl_coef": 0.0, "group_size": 2, **config_kwargs})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    initial = copy.deepcopy(model)
    return PPOTrainer(config, model, None, tokenizer, optimizer=optimizer), initial


def _forward64(model, experience):
    """float64 log-probs and values `[B, L-1]` of the experience's rows (position t predicts token t+1)."""
    out = model.pretrained_model(input_ids=experience.input_ids, attention_mask=experience.attention_mask,
                                 output_hidden_states=True)
    logp = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, experience.input_ids[:, 1:, None]).squeeze(-1)
    return logp, model.v_head(out.hidden_states[-1])[:, :-1, 0]


def _documented_loss(config, logp, values, experience, length):
    """The loss as docs/objectives.md states it, float64, from scratch (no fastppo function)."""
    m = experience.mask.double()
    n = m.sum(-1)
    old, adv = experience.old_logprobs.double(), experience.advantages.double()
    aggregate = {
        "token-mean": lambda x: (x * m).sum() / m.sum(),
        "seq-mean-token-mean": lambda x: ((x * m).sum(-1) / n).mean(),
        "seq-mean-token-sum": lambda x: (x * m).sum(-1).mean(),
        "seq-mean-token-sum-norm": lambda x: ((x * m).sum(-1) / length).mean(),
    }[config.loss_aggregation]
    if config.importance_sampling_level == "sequence":  # s_i · π_t / sg(π_t), s_i = exp(mean log-ratio) detached
        s = torch.exp(((logp - old) * m).sum(-1) / n).detach()
        ratio = s[:, None] * torch.exp(logp - logp.detach())
    else:
        ratio = torch.exp(logp - old)
    low = config.cliprange if config.cliprange_low is None else config.cliprange_low
    high = config.cliprange if config.cliprange_high is None else config.cliprange_high
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))
    if experience.rollout_logprobs is not None:
        pg = pg * torch.exp(old - experience.rollout_logprobs.double()).clamp(max=config.rollout_is_cap)
    loss = aggregate(pg)
    if config.advantage_estimator == "gae":
        old_v, ret = experience.old_values.double(), experience.returns.double()
        clipped = values.clamp(old_v - config.cliprange_value, old_v + config.cliprange_value)
        loss = loss + config.vf_coef * 0.5 * aggregate(torch.maximum((values - ret) ** 2, (clipped - ret) ** 2))
    if config.kl_loss_coef:
        d = experience.ref_logprobs.double() - logp
        loss = loss + config.kl_loss_coef * aggregate(torch.exp(d) - d - 1)
    return loss


def _expected_weights(config, initial, experience):
    model = copy.deepcopy(initial).double().eval()
    length = experience.mask.sum(-1).max().double()
    if config.loss_aggregation_length is not None:
        length = torch.tensor(float(config.loss_aggregation_length), dtype=torch.float64)
    for _ in range(EPOCHS):  # one mini-batch: one SGD step per epoch
        model.zero_grad()
        _documented_loss(config, *_forward64(model, experience), experience, length).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
    return model


OBJECTIVES = {
    "default": {},
    "seq-mean-token-mean+clip-higher": dict(loss_aggregation="seq-mean-token-mean", cliprange_low=0.1,
                                            cliprange_high=0.15),
    "seq-mean-token-sum+kl-loss": dict(loss_aggregation="seq-mean-token-sum", kl_loss_coef=0.3),
    "dr-grpo": dict(loss_aggregation="seq-mean-token-sum-norm"),
    "dr-grpo-length": dict(loss_aggregation="seq-mean-token-sum-norm", loss_aggregation_length=9),
    "gspo": dict(loss_aggregation="seq-mean-token-mean", importance_sampling_level="sequence", cliprange=0.05),
    "gspo-token-mean": dict(importance_sampling_level="sequence"),
}
CASES = ([("grpo", name) for name in OBJECTIVES]
         + [(estimator, name) for estimator in ("gae", "rloo", "reinforce_pp", "reinforce_pp_baseline")
            for name in ("default", "seq-mean-token-mean+clip-higher", "gspo")])


@pytest.mark.parametrize("estimator,objective,backend",
                         [case + ("torch",) for case in CASES]
                         + [("grpo", name, "triton") for name in ("dr-grpo", "gspo", "seq-mean-token-sum+kl-loss")]
                         + [("gae", "gspo", "triton")])
def test_sgd_moves_the_weights_by_the_documented_gradient(gpt2_dir, tokenizer, monkeypatch, estimator, objective,
                                                          backend):
    seen = record_experience(monkeypatch)
    trainer, initial = _sgd_trainer(gpt2_dir, tokenizer, advantage_estimator=estimator, backend=backend,
                                    **OBJECTIVES[objective])
    stats = trainer.step(*_grouped_batch(tokenizer))
    assert stats["fastppo/optimizer_steps"] == EPOCHS
    expected = _expected_weights(trainer.config, initial, seen[0])
    got = dict(trainer.unwrapped_model.named_parameters())
    moved = 0.0
    for name, want in expected.named_parameters():
        start = dict(initial.named_parameters())[name].detach().double()
        delta_got, delta_want = got[name].detach().double() - start, want.detach() - start
        torch.testing.assert_close(delta_got, delta_want, atol=1e-6, rtol=1e-3, msg=lambda msg: f"{name}: {msg}")
        moved = max(moved, float(delta_want.abs().max()))
    assert moved > 1e-3  # the weights did move well past the tolerance


def test_the_documented_losses_differ(gpt2_dir, tokenizer, monkeypatch):
    """The SGD test can tell the objectives apart: each one's weights differ from TRL's token mean by far more
    than its tolerance."""
    seen = record_experience(monkeypatch)
    trainer, initial = _sgd_trainer(gpt2_dir, tokenizer, advantage_estimator="grpo")
    trainer.step(*_grouped_batch(tokenizer))
    plain = _expected_weights(trainer.config, initial, seen[0])
    for name in ("seq-mean-token-mean+clip-higher", "seq-mean-token-sum+kl-loss", "dr-grpo", "gspo"):
        config = PPOConfig(**{"batch_size": 4, "mini_batch_size": 4, "group_size": 2, "init_kl_coef": 0.0,
                              "advantage_estimator": "grpo", **OBJECTIVES[name]})
        experience = seen[0]
        if config.kl_loss_coef:  # the reference's log-probs: the initial policy's
            experience = dataclasses.replace(experience, ref_logprobs=experience.old_logprobs)
        other = _expected_weights(config, initial, experience)
        gap = max(float((a - b).detach().abs().max()) for a, b in zip(plain.parameters(), other.parameters()))
        assert gap > 1e-4, name


def test_tis_with_grpo_weights_each_token(gpt2_dir, tokenizer, monkeypatch):
    seen = record_experience(monkeypatch)
    trainer, initial = _sgd_trainer(gpt2_dir, tokenizer, advantage_estimator="grpo", rollout_correction="tis",
                                    rollout_is_cap=1.2, loss_aggregation="seq-mean-token-mean")
    queries, responses, scores = _grouped_batch(tokenizer)
    generator = torch.Generator().manual_seed(5)
    # the tiny random policy gives each token ~log(1/320) ≈ −5.8: the weights fall on both sides of the cap
    rollout = [-5.8 + torch.randn(len(r), generator=generator) for r in responses]
    stats = trainer.step(queries, responses, scores, rollout_logprobs=rollout)
    assert 0 < stats["fastppo/policy/tis_clipfrac"] < 1
    expected = _expected_weights(trainer.config, initial, seen[0])
    for name, want in expected.named_parameters():
        have = dict(trainer.unwrapped_model.named_parameters())[name].detach().double()
        torch.testing.assert_close(have, want.detach(), atol=1e-6, rtol=1e-4, msg=lambda msg: f"{name}: {msg}")


def _train(model_dir, tokenizer, **config_kwargs):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    settings = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=0.1, group_size=2,
                    advantage_estimator="grpo", init_kl_coef=0.0, kl_loss_coef=0.1)
    settings.update(config_kwargs)
    config = PPOConfig(**settings)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    trainer = PPOTrainer(config, model, None, tokenizer, optimizer=optimizer)
    results = []
    for seed in range(2):
        queries, responses, scores = _grouped_batch(tokenizer, rows=8, seed=seed, max_response=20)
        mask = trainer._pad_batch(queries, responses, None).mask
        results.append((trainer.step(queries, responses, scores), mask.cpu().numpy().astype(bool)))
    return trainer, results


SPLITS = {
    "gradient_accumulation": dict(mini_batch_size=2, gradient_accumulation_steps=2),
    "token_budget": dict(max_tokens_per_microbatch=24),
    "packed": dict(padding_free=True),
    "packed_token_budget": dict(padding_free=True, max_tokens_per_microbatch=24),
}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS[1:] + ["token-mean"])
def test_a_split_mini_batch_trains_as_the_whole(gpt2_dir, tokenizer, split, aggregation):
    """Every aggregation is a per-token weight made for the whole backward batch, so its parts add up to it.
    (TRL's token mean under gradient accumulation is TRL's mean of the mini-batches' means: not this test's.)"""
    if split == "gradient_accumulation" and aggregation == "token-mean":
        pytest.skip("TRL 0.11's token mean averages the accumulated mini-batches' means (tests/trl parity)")
    if split.startswith("packed") and not varlen_attention.AVAILABLE:
        pytest.skip(f"no packed passes: {varlen_attention.UNAVAILABLE}")
    extra = dict(loss_aggregation=aggregation, importance_sampling_level="sequence")
    baseline = _train(gpt2_dir, tokenizer, **extra)
    candidate = _train(gpt2_dir, tokenizer, **extra, **SPLITS[split])
    if split == "gradient_accumulation":  # the same optimizer steps; the statistics are per (smaller) mini-batch
        expected = baseline[0].unwrapped_model.state_dict()
        for key, value in candidate[0].unwrapped_model.state_dict().items():
            torch.testing.assert_close(value, expected[key], msg=lambda m: f"{key}: {m}", **SGD_WEIGHTS)
    else:
        assert_same_training(baseline, candidate, SGD_WEIGHTS)


def test_bad_objective_settings_are_refused():
    with pytest.raises(ValueError, match="loss_aggregation"):
        PPOConfig(loss_aggregation="sum")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        PPOConfig(importance_sampling_level="seq")
    with pytest.raises(ValueError, match="loss_aggregation_length is the length of"):
        PPOConfig(loss_aggregation_length=8)
    with pytest.raises(ValueError, match="loss_aggregation_length"):
        PPOConfig(loss_aggregation="seq-mean-token-sum-norm", loss_aggregation_length=0)
