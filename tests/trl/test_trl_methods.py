"""TRL 0.11's public PPOTrainer methods, against what TRL 0.11.4 returned for the same inputs.

tests/data/trl_parity/methods.pt (make_method_fixtures.py, TRL's own venv) holds each method's
inputs and outputs; left_padding/ is a whole TRL run with tokenizer.padding_side="left".
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, DataCollatorWithPadding

from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from tolerances import TRAINER, WEIGHTS

DATA = Path(__file__).parents[1] / "data" / "trl_parity"
METHODS = torch.load(DATA / "methods.pt", weights_only=False)
FP32 = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("single_thread")  # as TRL's numbers were recorded


def _model():
    return AutoModelForCausalLMWithValueHead.from_pretrained(DATA / "init", attn_implementation="eager")


def _trainer(padding_side="right", backend="torch", trainer_class=PPOTrainer, **config):
    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    tokenizer.padding_side = padding_side
    config = PPOConfig(**dict(dict(batch_size=4, mini_batch_size=2, seed=0, backend=backend), **config))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PPOTrainer has no dataset")
        return trainer_class(config, _model(), _model(), tokenizer)


def _close(got, want, tolerance=FP32, where=""):
    got = got.detach().float() if isinstance(got, torch.Tensor) else torch.as_tensor(got, dtype=torch.float32)
    torch.testing.assert_close(got, torch.as_tensor(want).float(), msg=lambda m: f"{where}: {m}", **tolerance)


# ---------------------------------------------------------------------- the step's phases, one by one

@pytest.mark.parametrize("side", ["right", "left"])
def test_prepare_model_inputs_pads_on_the_tokenizer_side(side):
    recorded = METHODS["forward"]
    trainer = _trainer(side)
    got = trainer.prepare_model_inputs(recorded["data"]["queries"], recorded["data"]["responses"])
    assert set(got) == set(recorded[side]["model_inputs"]) == {"input_ids", "attention_mask"}
    for key, want in recorded[side]["model_inputs"].items():
        assert torch.equal(got[key], want), key


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("return_logits", [True, False])
def test_batched_forward_pass_matches_trl(side, return_logits, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    recorded, data = METHODS["forward"][side], METHODS["forward"]["data"]
    trainer = _trainer(side, backend)
    with torch.no_grad():
        logprobs, logits, values, masks = trainer.batched_forward_pass(
            trainer.model, data["queries"], data["responses"], recorded["model_inputs"],
            return_logits=return_logits, response_masks=data["response_masks"])
    assert torch.equal(masks, recorded["masks"])
    # Left pads attend to nothing; transformers 4.46 and 5 fill those rows differently. Compare the
    # positions whose input token is real: every one the step reads.
    real = recorded["model_inputs"]["attention_mask"][:, :-1].bool()
    _close(logprobs[real], recorded["logprobs"][real], where="logprobs")
    _close(values[real], recorded["values"][real], where="values")
    if return_logits:
        _close(logits[real], recorded["logits"][real], where="logits")
    else:
        assert logits is None


def test_batched_forward_pass_on_the_response_only_head_path():
    """With response_only_logits, log-probs on the response equal TRL's; off it they are 0 (documented)."""
    recorded, data = METHODS["forward"]["right"], METHODS["forward"]["data"]
    trainer = _trainer(response_only_logits=True)
    with torch.no_grad():
        logprobs, _, values, masks = trainer.batched_forward_pass(
            trainer.model, data["queries"], data["responses"], recorded["model_inputs"],
            response_masks=data["response_masks"])
    on = masks.bool()
    _close(logprobs[on], recorded["logprobs"][on], where="logprobs")
    assert torch.all(logprobs[~on] == 0)
    _close(values, recorded["values"], where="values")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("estimator", ["kl", "abs", "mse", "full"])
def test_compute_rewards_matches_trl(estimator, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    case = METHODS["rewards"][estimator]
    trainer = _trainer(kl_penalty=estimator, backend=backend)
    trainer.kl_ctl.value = case["kl_coef"]
    scores, logprobs, ref_logprobs, mask = case["inputs"]
    rewards, non_score, kls = trainer.compute_rewards(list(scores), logprobs, ref_logprobs, mask)
    want_rewards, want_non_score, want_kls = case["outputs"]
    on = mask.bool()
    _close(rewards[on], want_rewards[on], where="rewards")
    assert torch.all(rewards[~on] == 0)  # TRL leaves −kl_coef·kl there; every later use masks it
    _close(non_score, want_non_score, where="non_score_rewards")
    _close(kls, want_kls, where="kls")


def test_compute_rewards_full_needs_distributions():
    trainer = _trainer(kl_penalty="full")
    scores, logprobs, ref_logprobs, mask = METHODS["rewards"]["kl"]["inputs"]
    with pytest.raises(ValueError, match=r"logprobs: kl_penalty='full' needs the whole log-distributions"):
        trainer.compute_rewards(scores, logprobs, ref_logprobs, mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compute_advantages_matches_trl(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    case = METHODS["advantages"]
    trainer = _trainer(gamma=case["gamma"], lam=case["lam"], backend=backend)
    for got, want, name in zip(trainer.compute_advantages(*case["inputs"]), case["outputs"],
                               ("values", "advantages", "returns")):
        _close(got, want, where=name)


@pytest.mark.parametrize("case", ["plain", "ratio_skip"])
def test_loss_matches_trl(case):
    recorded = METHODS["loss"][case]
    trainer = _trainer(ratio_threshold=recorded["ratio_threshold"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pg_loss, vf_loss, stats = trainer.loss(*recorded["inputs"])
    assert any("exceeds ratio_threshold" in str(w.message) for w in caught) == (case == "ratio_skip")
    want_pg, want_vf, want_stats = recorded["outputs"]
    _close(pg_loss, want_pg, where="pg_loss")
    _close(vf_loss, want_vf, where="vf_loss")
    assert set(want_stats) <= set(stats)
    for key, want in want_stats.items():
        assert stats[key].shape == want.shape, key
        _close(stats[key], want, where=key)


def test_record_step_stats_matches_trl():
    recorded = METHODS["step_stats"]
    trainer = _trainer()
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recorded["inputs"].items()}
    stats = trainer.record_step_stats(recorded["kl_coef"], **data)
    want = recorded["outputs"]
    assert set(want) <= set(stats)
    for key, value in want.items():
        _close(np.asarray(stats[key], dtype=np.float32), np.asarray(value, dtype=np.float32), where=key)


def test_gather_stats_on_one_process_keeps_the_stats():
    trainer = _trainer()
    stats = {"a": torch.tensor(1.5), "b": torch.arange(3.0)}
    assert trainer.gather_stats(dict(stats)) == stats
    assert not trainer.is_distributed and not trainer.is_encoder_decoder


def test_public_phases_reproduce_step():
    """A TRL-style step written with the public methods (as TRL's own step is) trains as `step` does."""
    data = METHODS["forward"]["data"]
    queries, responses = data["queries"], data["responses"]
    scores = torch.stack(data["scores"])
    config = dict(ppo_epochs=1, mini_batch_size=4)
    reference = _trainer(**config)
    expected = reference.step(queries, responses, list(scores))

    trainer = _trainer(**config)
    inputs = trainer.prepare_model_inputs(queries, responses)
    with torch.no_grad():
        old_logprobs, _, old_values, masks = trainer.batched_forward_pass(trainer.model, queries, responses, inputs)
        ref_logprobs, _, _, _ = trainer.batched_forward_pass(trainer.ref_model, queries, responses, inputs)
        rewards, non_score, kls = trainer.compute_rewards(scores, old_logprobs, ref_logprobs, masks)
        values, advantages, returns = trainer.compute_advantages(old_values, rewards, masks)
    logprobs, logits, vpreds, _ = trainer.batched_forward_pass(trainer.model, queries, responses, inputs,
                                                               return_logits=True)
    train_stats = trainer.train_minibatch(old_logprobs, values, logprobs, logits, vpreds, masks, advantages, returns)
    stats = trainer.record_step_stats(
        trainer.kl_ctl.value, scores=scores, logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        non_score_reward=non_score, kls=kls, masks=masks, queries=queries, responses=responses,
        train_stats={key: value[None] for key, value in train_stats.items()})
    for key in ("objective/kl", "objective/entropy", "ppo/loss/total", "ppo/policy/approxkl", "ppo/val/error",
                "ppo/returns/var", "ppo/val/var_explained", "ppo/mean_non_score_reward"):
        _close(stats[key], expected[key], TRAINER, where=key)
    want = reference.unwrapped_model.state_dict()
    for key, value in trainer.unwrapped_model.state_dict().items():
        torch.testing.assert_close(value, want[key], msg=lambda m: f"{key}: {m}", **WEIGHTS)


@pytest.mark.parametrize("poison", ["values", "gradients"])
def test_train_minibatch_skips_a_non_finite_step_as_step_does(poison):
    """TRL-style code calling train_minibatch goes through the non-finite guard: a NaN value (or gradient)
    leaves the weights and the optimizer state as they were, with a warning; a finite call then steps."""
    data = METHODS["forward"]["data"]
    queries, responses = data["queries"], data["responses"]
    trainer = _trainer(ppo_epochs=1, mini_batch_size=4)
    inputs = trainer.prepare_model_inputs(queries, responses)
    with torch.no_grad():
        old_logprobs, _, old_values, masks = trainer.batched_forward_pass(trainer.model, queries, responses, inputs)
        rewards, _, _ = trainer.compute_rewards(torch.stack(data["scores"]), old_logprobs, old_logprobs, masks)
        values, advantages, returns = trainer.compute_advantages(old_values, rewards, masks)

    hooks = []

    def train(poisoned: bool):
        logprobs, logits, vpreds, _ = trainer.batched_forward_pass(trainer.model, queries, responses, inputs,
                                                                   return_logits=True)
        if poisoned and poison == "values":
            vpreds = vpreds + torch.where(masks.bool(), torch.nan, 0.0)
        if poisoned and poison == "gradients":  # finite outputs, a NaN gradient reaching one weight
            hooks.append(trainer.unwrapped_model.v_head.summary.weight.register_hook(lambda grad: grad * torch.nan))
        return trainer.train_minibatch(old_logprobs, values, logprobs, logits, vpreds, masks, advantages, returns)

    weights = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    with pytest.warns(UserWarning, match="optimizer step skipped for non-finite values"):
        train(poisoned=True)
    for key, value in trainer.unwrapped_model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert all(not state or float(state["step"]) == 0 for state in trainer.optimizer.state.values())
    for hook in hooks:
        hook.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(poisoned=False)
    assert not torch.equal(trainer.unwrapped_model.v_head.summary.weight, weights["v_head.summary.weight"])


# ---------------------------------------------------------------------- the tokenizer's padding side

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_left_padding_step_matches_trl(backend):
    """TRL pads the step's batch on tokenizer.padding_side; GPT-2's positions then shift, and so do the numbers."""
    if backend == "triton":
        pytest.importorskip("triton")
    case = DATA / "left_padding"
    trainer = _trainer("left", backend, **json.loads((case / "config.json").read_text()))
    recorded = json.loads((case / "stats.json").read_text())["steps"]
    for inputs, expected in zip(torch.load(case / "inputs.pt")["steps"], recorded):
        stats = trainer.step(inputs["queries"], inputs["responses"], inputs["scores"])
        real = np.asarray(expected["_model_inputs"]["attention_mask"])[:, :-1] == 1  # see the forward-pass test
        for key, value in expected.items():
            if key.startswith(("_", "kl_ctl", "time/")):
                continue
            got, want = np.asarray(stats[key], dtype=np.float64), np.asarray(value, np.float64)
            if key in ("objective/logprobs", "objective/ref_logprobs"):
                got, want = got[real], want[real]
            np.testing.assert_allclose(got, want, err_msg=key, **TRAINER)
    final = load_file(case / "final.safetensors")
    state = trainer.unwrapped_model.state_dict()
    for key, want in final.items():
        torch.testing.assert_close(state[key].float(), want, msg=lambda m: f"{key}: {m}", **WEIGHTS)
    right = json.loads((DATA / "default" / "stats.json").read_text())["steps"][0]
    assert abs(recorded[0]["ppo/loss/value"] - right["ppo/loss/value"]) > 1e-4  # the side does change numbers


def test_padding_free_ignores_the_padding_side():
    """Packed rows have no pads: a left-padding tokenizer trains exactly as a right-padding one."""
    data = METHODS["forward"]["data"]
    runs = []
    for side in ("right", "left"):
        trainer = _trainer(side, padding_free=True)
        runs.append(trainer.step(data["queries"], data["responses"], data["scores"]))
    for key in ("objective/kl", "ppo/loss/total", "ppo/val/error"):
        assert runs[0][key] == runs[1][key], key


def test_training_data_collator_pads_the_step():
    trainer = _trainer()
    tokenizer = trainer.tokenizer
    trainer.data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=16)
    data = METHODS["forward"]["data"]
    inputs = trainer.prepare_model_inputs(data["queries"], data["responses"])
    assert inputs["input_ids"].shape[1] == 16 and "labels" not in inputs
    trainer.step(data["queries"], data["responses"], data["scores"])  # trains on the collator's batch


# ---------------------------------------------------------------------- construction, subclasses, saving

def test_no_dataset_warns_as_trl():
    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    with pytest.warns(UserWarning, match="PPOTrainer has no dataset"):
        PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), _model(), None, tokenizer)


def test_overriding_a_phase_changes_step():
    """step calls compute_rewards, as TRL's does: a subclass's reward shaping reaches the training."""

    class Shaped(PPOTrainer):
        def compute_rewards(self, scores, logprobs, ref_logprobs, masks, **kwargs):
            rewards, non_score, kls = super().compute_rewards(scores, logprobs, ref_logprobs, masks, **kwargs)
            return rewards + 0.5 * masks, non_score, kls

    data = METHODS["forward"]["data"]
    plain = _trainer().step(data["queries"], data["responses"], data["scores"])
    shaped = _trainer(trainer_class=Shaped).step(data["queries"], data["responses"], data["scores"])
    assert shaped["ppo/returns/mean"] > plain["ppo/returns/mean"] + 0.4


def test_overriding_a_method_step_does_not_call_warns():
    class CustomLoss(PPOTrainer):
        def loss(self, *args):
            return super().loss(*args)

    with pytest.warns(UserWarning, match="overrides loss, which fastppo's step does not call"):
        _trainer(trainer_class=CustomLoss)


def test_save_pretrained_goes_through_the_save_hook(tmp_path):
    class WithCard(PPOTrainer):
        def _save_pretrained(self, save_directory):
            super()._save_pretrained(save_directory)
            self.create_model_card(save_directory, model_name="tiny")

    trainer = _trainer(trainer_class=WithCard)
    trainer.save_pretrained(str(tmp_path))
    assert "# tiny" in (tmp_path / "README.md").read_text()
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.v_head.summary.weight, trainer.unwrapped_model.v_head.summary.weight)
    assert os.path.isfile(tmp_path / "tokenizer_config.json")


def test_trl_attributes():
    trainer = _trainer()
    assert trainer.model_params == [p for p in trainer.model.parameters() if p.requires_grad]
    with trainer.optional_peft_ctx():
        pass
    assert trainer._early_stop(torch.tensor(100.0)) is False  # early_stopping off
