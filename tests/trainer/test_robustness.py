"""Nothing poisoned, nothing half-done: non-finite guards, a step that raises midway, trainer-level bad input,
and the low-precision warning (issue 13, items 1, 3, 4 and 5)."""

import math
import warnings

import pytest
import torch

from conftest import assert_trainer_unchanged, dtype_kwarg, make_batch, trainer_state
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from fastppo.training import step_guard

BATCH = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2)  # 4 optimizer steps per PPO step


def _trainer(gpt2_dir, tokenizer, **config):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PPOTrainer has no dataset")
        return PPOTrainer(PPOConfig(**{**BATCH, "learning_rate": 1e-2, **config}), model, None, tokenizer)


@pytest.fixture()
def trained(gpt2_dir, tokenizer):
    """A trainer one step in: Adam holds state worth protecting."""
    trainer = _trainer(gpt2_dir, tokenizer, use_score_scaling=True)
    trainer.step(*make_batch(tokenizer, 4, seed=1))
    return trainer


def _finite(trainer) -> bool:
    tensors = list(trainer.unwrapped_model.state_dict().values())
    tensors += [v for state in trainer.optimizer.state_dict()["state"].values() for v in state.values()
                if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors) and math.isfinite(trainer.kl_ctl.value)


def _poison_on_training_call(module, calls: set, poison):
    """Apply `poison` to `module`'s output on the given training-forward calls (0-based; grad enabled)."""
    count = {"n": -1}

    def hook(_, __, output):
        if not torch.is_grad_enabled():
            return output
        count["n"] += 1
        return poison(output) if count["n"] in calls else output

    return module.register_forward_hook(hook)


def _nan(output):
    return output + float("nan")


# ---------------------------------------------------------------------- non-finite values

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("source", ["logits", "values"])
def test_one_nonfinite_minibatch_is_skipped(trained, tokenizer, source, backend):
    """NaN in one mini-batch's training outputs: that optimizer step is skipped (on the device: the default
    optimizer is fused Adam), the rest train, nothing is NaN."""
    assert trained.optimizer.optimizer.defaults["fused"]
    if backend == "triton":
        pytest.importorskip("triton")
    trained.config.backend = backend
    trained._config_at_start["backend"] = backend
    model = trained.unwrapped_model
    module = model.lm_head if source == "logits" else model.v_head
    adam_steps = [float(s["step"]) for s in trained.optimizer.state_dict()["state"].values()]
    handle = _poison_on_training_call(module, {1}, _nan)
    try:
        with pytest.warns(UserWarning, match=f"1 optimizer step\\(s\\) skipped .*the {source} of mini-batch 1"):
            stats = trained.step(*make_batch(tokenizer, 4, seed=2))
    finally:
        handle.remove()
    assert stats["fastppo/skipped_nonfinite"] == 1 and stats["fastppo/optimizer_steps"] == 3
    assert _finite(trained)
    assert all(math.isfinite(v) for v in stats.values() if isinstance(v, float))  # the skipped one is left out
    assert [float(s["step"]) for s in trained.optimizer.state_dict()["state"].values()] == [s + 3 for s in adam_steps]


def test_an_optimizer_without_a_device_skip_is_guarded_on_the_host(gpt2_dir, tokenizer):
    """A non-fused optimizer (no `found_inf`): the guard decides on the host, with the same outcome."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PPOTrainer has no dataset")
        trainer = PPOTrainer(PPOConfig(**BATCH), model, None, tokenizer, optimizer=optimizer)
    assert not getattr(trainer.optimizer.optimizer, "_step_supports_amp_scaling", False)
    handle = _poison_on_training_call(model.v_head, {2}, _nan)
    try:
        with pytest.warns(UserWarning, match="the values of mini-batch 2"):
            stats = trainer.step(*make_batch(tokenizer, 4, seed=2))
    finally:
        handle.remove()
    assert stats["fastppo/skipped_nonfinite"] == 1 and stats["fastppo/optimizer_steps"] == 3 and _finite(trainer)
    assert {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {3.0}


def test_nonfinite_gradient_is_skipped(trained, tokenizer):
    """A finite forward whose backward overflows: the gradient norm catches it."""
    weight = trained.unwrapped_model.v_head.summary.weight
    calls = {"n": 0}

    def overflow(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    handle = weight.register_hook(overflow)
    try:
        with pytest.warns(UserWarning, match="the grad norm of mini-batch 1"):
            stats = trained.step(*make_batch(tokenizer, 4, seed=2))
    finally:
        handle.remove()
    assert stats["fastppo/skipped_nonfinite"] == 1 and _finite(trained)


def test_nan_weight_raises_where_it_started_and_changes_nothing(trained, tokenizer, tmp_path):
    name = "pretrained_model.transformer.h.0.mlp.c_fc.weight"
    with torch.no_grad():
        trained.unwrapped_model.get_parameter(name)[0, 0] = float("nan")
    before = trainer_state(trained)
    with pytest.raises(FloatingPointError, match="weight transformer.h.0.mlp.c_fc.weight already holds NaN"):
        trained.step(*make_batch(tokenizer, 4, seed=2))
    assert_trainer_unchanged(before, trainer_state(trained))
    with pytest.raises(ValueError, match="weight transformer.h.0.mlp.c_fc.weight holds NaN/inf; refusing"):
        trained.save_pretrained(str(tmp_path / "poisoned"))
    assert not (tmp_path / "poisoned").exists()


def test_every_minibatch_nonfinite_in_training_raises(trained, tokenizer):
    before = trainer_state(trained)
    handle = _poison_on_training_call(trained.unwrapped_model.lm_head, set(range(8)), _nan)
    try:
        with pytest.raises(FloatingPointError, match="all 4 optimizer steps .*started in the training forward"):
            trained.step(*make_batch(tokenizer, 4, seed=2))
    finally:
        handle.remove()
    assert_trainer_unchanged(before, trainer_state(trained))


def test_nonfinite_kl_leaves_the_controller(trained, tokenizer):
    class NaNKL(PPOTrainer):
        def record_step_stats(self, kl_coef, **data):
            stats = super().record_step_stats(kl_coef, **data)
            stats["objective/kl"] = torch.tensor(float("nan"))
            return stats

    trained.__class__ = NaNKL
    value = trained.kl_ctl.value
    with pytest.warns(UserWarning, match="objective/kl is nan: the KL coefficient was not updated"):
        trained.step(*make_batch(tokenizer, 4, seed=2))
    assert trained.kl_ctl.value == value


def test_guard_off_lets_nan_through(gpt2_dir, tokenizer):
    """nonfinite_guard=False is TRL's behaviour: the NaN reaches the weights (what the guard prevents)."""
    trainer = _trainer(gpt2_dir, tokenizer, nonfinite_guard=False)
    handle = _poison_on_training_call(trainer.unwrapped_model.v_head, {0}, _nan)
    try:
        stats = trainer.step(*make_batch(tokenizer, 4, seed=2))
    finally:
        handle.remove()
    assert stats["fastppo/skipped_nonfinite"] == 0 and not _finite(trainer)


# ---------------------------------------------------------------------- a step that raises midway

@pytest.mark.parametrize("accumulation", [1, 2])
def test_failing_optimizer_leaves_a_clean_trainer(gpt2_dir, tokenizer, accumulation):
    trainer = _trainer(gpt2_dir, tokenizer, gradient_accumulation_steps=accumulation, use_score_scaling=True,
                       mini_batch_size=2 // accumulation)
    trainer.step(*make_batch(tokenizer, 4, seed=1))
    inner = trainer.optimizer.optimizer
    step, calls = inner.step, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second optimizer step of the next PPO step
            raise RuntimeError("optimizer failed")
        return step(*args, **kwargs)

    inner.step = failing
    before = trainer_state(trainer)
    with pytest.raises(RuntimeError, match="optimizer failed"):
        trainer.step(*make_batch(tokenizer, 4, seed=2))
    after = trainer_state(trainer)
    assert all(p.grad is None for p in trainer.model.parameters())
    for key in ("kl_coef", "running", "current_step", "training", "accumulation_phase"):
        assert after[key] == before[key], key
    inner.step = step
    trainer.step(*make_batch(tokenizer, 4, seed=3))  # trains on from a clean state
    assert _finite(trainer)


# ---------------------------------------------------------------------- trainer-level bad input

def test_sequences_longer_than_the_model_refused(trained, tokenizer):
    queries, responses, scores = make_batch(tokenizer, 4, seed=2)
    responses[2] = torch.randint(2, 50, (130,))  # the tiny GPT-2 has 128 positions
    before = trainer_state(trained)
    with pytest.raises(ValueError, match=r"queries\[2\] \+ responses\[2\] is \d+ tokens, longer than the model's "
                                         r"128 positions"):
        trained.step(queries, responses, scores)
    assert_trainer_unchanged(before, trainer_state(trained))
    with pytest.raises(ValueError, match=r"query_tensor\[0\] \+ max_new_tokens \(200\) is \d+ tokens"):
        trained.generate(queries, max_new_tokens=200)
    with pytest.raises(ValueError, match=r"query_tensor \+ max_new_tokens \(127\)"):
        trained.generate(queries[0], max_new_tokens=127)


def test_config_changed_after_construction_refused(trained, tokenizer):
    trained.config.batch_size = 8
    trained.config.cliprange = 0.5
    before = trainer_state(trained)
    with pytest.raises(ValueError, match=r"config fields \['batch_size', 'cliprange'\] changed after"):
        trained.step(*make_batch(tokenizer, 8, seed=2))
    assert_trainer_unchanged(before, trainer_state(trained))


def test_mismatched_reference_or_optimizer_refused(gpt2_dir, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    other_vocab = AutoModelForCausalLMWithValueHead(GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer) + 8, n_positions=128, n_embd=32, n_layer=1, n_head=2)))
    config = PPOConfig(**BATCH)
    with pytest.raises(ValueError, match="ref_model has a vocabulary of .* but the policy has"):
        PPOTrainer(config, model, other_vocab, tokenizer)
    with pytest.raises(ValueError, match="optimizer holds none of the policy's trainable parameters"):
        PPOTrainer(config, model, None, tokenizer, optimizer=torch.optim.Adam(other_vocab.parameters()))


# ---------------------------------------------------------------------- low-precision training

def test_bf16_weights_without_mixed_precision_warn(gpt2_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, **dtype_kwarg(torch.bfloat16))
    with pytest.warns(UserWarning, match="trainable parameters are torch.bfloat16 and no mixed precision"):
        PPOTrainer(PPOConfig(**BATCH), model, None, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="PPOTrainer has no dataset")
        PPOTrainer(PPOConfig(**BATCH), AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir), None, tokenizer)


# ---------------------------------------------------------------------- the optimizer step itself

def test_the_torch_optimizer_steps_without_accelerates_per_call_search(gpt2_dir, tokenizer, monkeypatch):
    """accelerate's optimizer wrapper asks importlib for `lomo_optim` on every step (and reads a signature on every
    zero_grad); where it would only pass the call on, the guard steps and zeroes the torch optimizer itself (every mini-batch's step applied); elsewhere the wrapper's step
    runs."""
    import accelerate.optimizer

    searches, wrapper_zero_grads = [], []
    monkeypatch.setattr(accelerate.optimizer, "is_lomo_available", lambda: bool(searches.append(1)))
    zero_grad = accelerate.optimizer.AcceleratedOptimizer.zero_grad
    monkeypatch.setattr(accelerate.optimizer.AcceleratedOptimizer, "zero_grad",
                        lambda self, *a, **k: wrapper_zero_grads.append(1) or zero_grad(self, *a, **k))
    trainer = _trainer(gpt2_dir, tokenizer)
    stats = trainer.step(*make_batch(tokenizer, 4, seed=2))
    assert not searches and not wrapper_zero_grads and stats["fastppo/skipped_nonfinite"] == 0
    assert all(p.grad is None for p in trainer.unwrapped_model.parameters())  # zeroed as the wrapper does it
    assert {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {4.0}  # BATCH

    state = trainer.accelerator.gradient_state  # mid-accumulation: accelerate's wrapper decides (not to step)
    state._set_sync_gradients(False)
    try:
        step_guard.step_optimizer(trainer.optimizer, trainer.accelerator)
    finally:
        state._set_sync_gradients(True)
    assert searches
    assert {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()} == {4.0}


def test_output_flags_see_only_trained_positions():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    logprobs, values = torch.zeros(2, 3), torch.zeros(2, 3)
    logprobs[0, 2], values[1, 0] = float("nan"), float("inf")  # off the trained positions: ignored
    assert step_guard.output_flags(logprobs, values, mask, torch.tensor(1.0)).tolist() == [False, False, False]
    logprobs[1, 2] = float("-inf")
    assert step_guard.output_flags(logprobs, values, mask, torch.tensor(1.0)).tolist() == [True, False, False]
    values[0, 1] = float("nan")
    assert step_guard.output_flags(logprobs, values.bfloat16(), mask, torch.tensor(float("nan"))).tolist() == [
        True, True, True]
    empty = torch.zeros(0, 3)
    assert step_guard.output_flags(empty, empty, empty, torch.tensor(1.0)).tolist() == [False, False, False]
