"""TRL 0.11.4's own PPOTrainer tests (its tests/test_ppo_trainer.py), ported where fastppo's tests did not cover them.

Each test names the TRL test it ports. Covered elsewhere: test_drop_last_dataloader
(test_trainer.py::test_dataset_gives_a_dataloader_of_batch_size), test_ppo_step_with_no_ref_custom_layers
and ..._with_ref_and_custom_layers_warning (test_trainer.py::test_num_shared_layers_*), test_ppo_step_no_dataset
(test_trl_methods.py::test_no_dataset_warns_as_trl, test_quickstart.py), test_ppo_trainer_max_grad_norm
(test_trl_parity.py, grad_accum), test_peft_model_ppo_adapter_rm_trainer
(test_trl_model_surface.py::test_trainer_steps_a_policy_with_a_reward_adapter), test_push_to_hub_if_best_reward
(test_trainer.py::test_push_to_hub_if_best), test_batch_size_check (test_config.py). Not ported: the T5
(seq2seq) cases and the multi-GPU PEFT test.
"""

import copy
import json
import math
import os
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

PARITY = Path(__file__).parents[1] / "data" / "trl_parity"

pytestmark = pytest.mark.filterwarnings("ignore:PPOTrainer has no dataset")


def load(model_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)


def make_trainer(model, tokenizer, ref_model=None, **config):
    settings = dict(batch_size=2, mini_batch_size=1)
    settings.update(config)
    return PPOTrainer(PPOConfig(**settings), model, ref_model, tokenizer)


def keep_gradients(trainer):
    """TRL's tests' trick: zero gradients in place, so after `step` a parameter has a `.grad` iff it got one."""
    trainer.optimizer.zero_grad = partial(trainer.optimizer.zero_grad, set_to_none=False)


def state(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- step


@pytest.mark.parametrize("ref", ["given", "copy"])
def test_step_gives_every_policy_parameter_a_gradient_and_the_reference_none(gpt2_dir, tokenizer, ref):
    """TRL: test_ppo_step, test_ppo_step_with_no_ref. Also: the first step's KL is exactly 0 (policy == reference)."""
    model = load(gpt2_dir)
    trainer = make_trainer(model, tokenizer, copy.deepcopy(model) if ref == "given" else None)
    keep_gradients(trainer)
    stats = trainer.step(*make_batch(tokenizer, 2))
    assert stats["objective/kl"] == 0.0 and not np.any(stats["objective/kl_dist"])
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert [name for name, p in trainer.ref_model.named_parameters() if p.grad is not None] == []


def test_reference_copy_keeps_the_initial_weights(gpt2_dir, tokenizer):
    """TRL: test_ppo_step_with_no_ref (the reference made from the policy is not trained)."""
    model = load(gpt2_dir)
    initial = state(model)
    trainer = make_trainer(model, tokenizer, learning_rate=1e-2)
    batch = make_batch(tokenizer, 2)
    trainer.step(*batch)
    assert trainer.step(*batch)["objective/kl"] != 0.0  # the policy moved away from it
    reference = trainer.ref_model.state_dict()
    assert set(reference) == set(initial)
    for key, value in initial.items():
        assert torch.equal(reference[key], value), key


def test_given_optimizer_and_scheduler_are_the_ones_stepped(gpt2_dir, tokenizer):
    """TRL: test_ppo_step_with_no_ref_sgd, test_ppo_step_with_no_ref_sgd_lr_scheduler."""
    model = load(gpt2_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, ppo_epochs=1), model, None, tokenizer,
                         optimizer=optimizer, lr_scheduler=scheduler)
    assert trainer.optimizer.optimizer is optimizer and trainer.lr_scheduler.scheduler is scheduler
    rates = [trainer.step(*make_batch(tokenizer, 2, seed=seed))["ppo/learning_rate"] for seed in (0, 1)]
    assert rates == pytest.approx([0.01, 0.009], rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0081, rel=1e-12)


def test_all_ones_response_masks_train_exactly_as_no_masks(gpt2_dir, tokenizer):
    """TRL: test_ppo_step_with_masks."""
    model = load(gpt2_dir)
    queries, responses, scores = make_batch(tokenizer, 2)
    runs = []
    for masks in (None, [torch.ones_like(r) for r in responses]):
        trainer = make_trainer(copy.deepcopy(model), tokenizer)
        runs.append((trainer.step(queries, responses, scores, response_masks=masks), state(trainer.unwrapped_model)))
    (plain, plain_weights), (masked, masked_weights) = runs
    for key, value in plain.items():
        if not key.startswith("time/") and key != "fastppo/tokens_per_s":
            np.testing.assert_array_equal(masked[key], value, err_msg=key)
    for key, value in plain_weights.items():
        assert torch.equal(masked_weights[key], value), key


def test_step_inputs_are_checked_and_squeezed_as_trl(gpt2_dir, tokenizer):
    """TRL: test_ppo_step_input_shape, test_ppo_step_rewards_shape."""
    trainer = make_trainer(load(gpt2_dir), tokenizer)
    queries, responses, _ = make_batch(tokenizer, 2)
    checked = trainer._step_safety_checker(2, queries, responses, [torch.tensor([1.0]), torch.tensor(0.0)])
    assert len(checked) == 4 and all(isinstance(part, list) for part in checked[:3]) and checked[3] is None
    for got, given in zip(checked[0] + checked[1], queries + responses):
        assert torch.equal(got, given)
    assert [score.shape for score in checked[2]] == [torch.Size([])] * 2  # a one-element score is squeezed
    assert [float(score) for score in checked[2]] == [1.0, 0.0]
    with pytest.raises(ValueError):
        trainer.step(queries, responses, [torch.tensor([[1.0]]), torch.tensor([[0.0]])])


def test_step_stats_have_trls_keys_types_and_shapes():
    """TRL: EXPECTED_STATS of every step test; types and shapes as trl 0.11.4 returned them (`_stat_types`)."""
    tokenizer = AutoTokenizer.from_pretrained(PARITY / "tokenizer")
    models = [AutoModelForCausalLMWithValueHead.from_pretrained(PARITY / "init", attn_implementation="eager")
              for _ in range(2)]
    config = PPOConfig(**json.loads((PARITY / "default" / "config.json").read_text()))
    trainer = PPOTrainer(config, *models, tokenizer)
    inputs = torch.load(PARITY / "default" / "inputs.pt")["steps"][0]
    stats = trainer.step(inputs["queries"], inputs["responses"], inputs["scores"])
    recorded = json.loads((PARITY / "default" / "stats.json").read_text())["steps"][0]["_stat_types"]
    assert set(recorded) <= set(stats)
    for key, kind in recorded.items():
        if kind.startswith("ndarray"):
            assert isinstance(stats[key], np.ndarray) and list(stats[key].shape) == json.loads(kind[7:]), key
        else:
            assert type(stats[key]).__name__ == kind, key


def test_gradient_accumulation_equals_one_larger_minibatch(gpt2_dir, tokenizer):
    """TRL: test_grad_accumulation (here with SGD, so the comparison sees the gradients themselves)."""
    model = load(gpt2_dir)
    initial = state(model)
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    responses = [torch.tensor([10, 11, 12, 13]), torch.tensor([14, 15, 16, 17])]  # same length: same token weight
    scores = [torch.tensor(1.0), torch.tensor(-0.5)]
    finals = []
    for mini_batch_size, accumulation in ((2, 1), (1, 2)):
        policy = copy.deepcopy(model)
        trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=mini_batch_size, ppo_epochs=1,
                                       gradient_accumulation_steps=accumulation), policy, None, tokenizer,
                             optimizer=torch.optim.SGD(policy.parameters(), lr=0.1))
        assert trainer.step(queries, responses, scores)["fastppo/optimizer_steps"] == 1
        finals.append(state(policy))
    assert not torch.equal(finals[0]["v_head.summary.weight"], initial["v_head.summary.weight"])
    for key, value in finals[0].items():
        torch.testing.assert_close(finals[1][key], value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


# ---------------------------------------------------------------------------------------------- TRL's methods


def test_loss_is_the_same_with_masked_positions_removed(gpt2_dir, tokenizer):
    """TRL: test_loss_trainer."""
    trainer = make_trainer(load(gpt2_dir), tokenizer)
    g = torch.Generator().manual_seed(0)
    old_logprobs = -torch.rand(1, 7, generator=g) - 0.5
    logprobs = old_logprobs + 0.6 * (torch.rand(1, 7, generator=g) - 0.5)  # some ratios outside the clip range
    values, vpreds, advantages, returns = torch.randn(4, 1, 7, generator=g)
    logits = torch.randn(1, 7, 5, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0]])
    args = dict(old_logprobs=old_logprobs, values=values, logits=logits, vpreds=vpreds, logprobs=logprobs,
                mask=mask, advantages=advantages, returns=returns)
    keep = mask[0].bool()
    full = trainer.loss(**args)
    compact = trainer.loss(**{name: value[:, keep] for name, value in args.items()})
    torch.testing.assert_close(compact[0], full[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compact[1], full[1], rtol=1e-6, atol=1e-7)
    assert full[0].abs() > 1e-3 and full[1] > 1e-3
    for key, value in full[2].items():
        if value.dim() == 0:
            torch.testing.assert_close(compact[2][key], value, rtol=1e-6, atol=1e-7, msg=lambda m: f"{key}: {m}")


def test_batched_forward_pass_does_not_depend_on_batching(model_dir, tokenizer):
    """TRL: test_batched_forward_pass (gpt2, and Llama in place of TRL's right-padded Bloom)."""
    model = load(model_dir)
    queries = [torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 7, 8, 9, 10, 11])]
    responses = [torch.tensor([12, 13, 14, 15, 16]), torch.tensor([17, 18, 19, 20, 21, 22])]
    outputs = {}
    for mini_batch_size in (1, 2):
        trainer = make_trainer(copy.deepcopy(model), tokenizer, mini_batch_size=mini_batch_size)
        for name, rows in (("alone", slice(0, 1)), ("batch", slice(0, 2))):
            q, r = queries[rows], responses[rows]
            with torch.no_grad():
                logprobs, _, values, masks = trainer.batched_forward_pass(trainer.model, q, r,
                                                                          trainer.prepare_model_inputs(q, r))
            outputs[name, mini_batch_size] = logprobs, values, masks.bool()
    reference_logprobs, reference_values, reference_mask = outputs["batch", 2]  # one padded pass
    for logprobs, values, mask in outputs.values():
        for row in range(logprobs.shape[0]):  # each row's response tokens, whatever its padding
            on, reference_on = mask[row], reference_mask[row]
            assert on.sum() == len(responses[row])
            torch.testing.assert_close(logprobs[row][on], reference_logprobs[row][reference_on], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values[row][on], reference_values[row][reference_on], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator, expected", [("kl", [0.2, -0.6, 0.0]), ("abs", [0.2, 0.6, 0.0]),
                                                 ("mse", [0.02, 0.18, 0.0])])
def test_kl_penalty_per_token(gpt2_dir, tokenizer, estimator, expected):
    """TRL: test_ppo_trainer_kl_penalty."""
    trainer = make_trainer(load(gpt2_dir), tokenizer, kl_penalty=estimator)
    logprob, ref_logprob = torch.tensor([[-0.5, -1.0, -2.0]]), torch.tensor([[-0.7, -0.4, -2.0]])
    torch.testing.assert_close(trainer._kl_penalty(logprob, ref_logprob), torch.tensor([expected]),
                               rtol=1e-6, atol=1e-7)


def test_full_kl_penalty_is_the_exact_divergence(gpt2_dir, tokenizer):
    """TRL: test_ppo_trainer_full_kl_penalty: [B, T, V] log-distributions in, [B, T] KL out."""
    trainer = make_trainer(load(gpt2_dir), tokenizer, kl_penalty="full")
    p = torch.tensor([[[0.98, 0.01, 0.01], [0.2, 0.3, 0.5]]])
    q = torch.tensor([[[0.01, 0.01, 0.98], [0.2, 0.3, 0.5]]])
    kl = trainer._kl_penalty(p.log(), q.log())
    assert kl.shape == (1, 2)
    torch.testing.assert_close(kl, torch.tensor([[0.97 * math.log(98.0), 0.0]]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- PEFT


def test_user_built_peft_model_trains_only_adapter_and_value_head(gpt2_dir, tokenizer):
    """TRL: test_peft_model_ppo_trainer (a PeftModel built by the user, then wrapped; a second step after
    `model.train()` and `gradient_checkpointing_enable()`)."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["c_attn"], fan_in_fan_out=True,
                           task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        peft.get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_dir), lora))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainer = make_trainer(model, tokenizer, learning_rate=1e-2)
    assert trainer.is_peft_model and trainer.ref_model is None
    keep_gradients(trainer)
    batch = make_batch(tokenizer, 2)
    trainer.step(*batch)
    model.train()
    model.gradient_checkpointing_enable()
    trainer.step(*batch)
    with_gradient = {name for name, p in model.named_parameters() if p.grad is not None}
    adapter_and_head = {name for name, _ in model.named_parameters() if "lora_" in name or name.startswith("v_head.")}
    assert with_gradient == adapter_and_head and any("lora_A" in name for name in with_gradient)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(not p.eq(0).all() for name, p in model.named_parameters() if "lora_B" in name)  # the adapter moved


# ---------------------------------------------------------------------------------------------- generate

GREEDY = dict(do_sample=False, max_new_tokens=4)
PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([9, 10, 11, 12, 13])]


def test_greedy_generate_of_a_list_equals_one_query_at_a_time(model_dir, tokenizer):
    """TRL: test_generation (the list is left-padded into one batch)."""
    trainer = make_trainer(load(model_dir), tokenizer)
    batched = trainer.generate(PROMPTS, batch_size=2, **GREEDY)
    single = [trainer.generate(prompt, **GREEDY) for prompt in PROMPTS]
    assert all(s.shape[0] == 1 for s in single)
    assert [b.tolist() for b in batched] == [s[0].tolist() for s in single]
    assert all(len(b) > len(p) for b, p in zip(batched, PROMPTS))


def test_generate_ref_response_samples_the_reference(gpt2_dir, tokenizer):
    """TRL: test_generation_with_ref_model (a reference whose LM head is negated answers differently)."""
    model = load(gpt2_dir)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        ref_model.pretrained_model.lm_head.weight.neg_()
    trainer = make_trainer(model, tokenizer, ref_model)
    batched, ref_batched = trainer.generate(PROMPTS, batch_size=2, generate_ref_response=True, **GREEDY)
    single = [trainer.generate(prompt, generate_ref_response=True, **GREEDY) for prompt in PROMPTS]
    assert [b.tolist() for b in batched] == [s[0][0].tolist() for s in single]
    assert [b.tolist() for b in ref_batched] == [s[1][0].tolist() for s in single]
    assert [b.tolist() for b in batched] != [b.tolist() for b in ref_batched]
    ref_model.eval()  # as generate samples: a model loaded for training is in train mode, with dropout
    for prompt, response in zip(PROMPTS, ref_batched):
        direct = ref_model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    pad_token_id=tokenizer.pad_token_id, **GREEDY)
        assert response.tolist() == direct[0].tolist()


def test_generate_leaves_every_module_mode_as_it_was(gpt2_dir, tokenizer):
    """TRL: test_generation_with_ref_model, followed by a look at the models' modes."""
    model = load(gpt2_dir)
    trainer = make_trainer(model, tokenizer, copy.deepcopy(model))
    modes = lambda m: {name: module.training for name, module in m.named_modules()}  # noqa: E731
    before = modes(trainer.unwrapped_model), modes(trainer.ref_model)
    trainer.generate(PROMPTS, generate_ref_response=True, **GREEDY)
    assert (modes(trainer.unwrapped_model), modes(trainer.ref_model)) == before


@pytest.mark.parametrize("how", ["generate_ref_response", "ref_model.train()"])
def test_reference_logprobs_never_get_dropout(gpt2_dir, tokenizer, how):
    """TRL: test_generation_with_ref_model then test_ppo_step: whatever mode the reference was left in, the
    first step's KL to an identical reference is exactly 0."""
    model = load(gpt2_dir)
    ref_model = copy.deepcopy(model)
    trainer = make_trainer(model, tokenizer, ref_model)
    if how == "generate_ref_response":
        trainer.generate(PROMPTS, generate_ref_response=True, **GREEDY)
    else:
        ref_model.train()
    stats = trainer.step(*make_batch(tokenizer, 2))
    assert stats["objective/kl"] == 0.0 and not np.any(stats["objective/kl_dist"])


# ---------------------------------------------------------------------------------------------- push_to_hub

COMMIT_URL = "https://huggingface.co/me/ppo/commit/0123abcd"


@pytest.fixture()
def hub(monkeypatch):
    """The hub calls of transformers' and huggingface_hub's push_to_hub, recorded: one entry per commit,
    `(repo_id, {path in repo: safetensors keys or None})`."""
    import huggingface_hub
    import transformers.utils.hub
    from huggingface_hub import ModelCard, ModelCardData
    from safetensors import safe_open

    commits = []

    def contents(paths):
        return {name: set(safe_open(path, "pt").keys()) if name.endswith(".safetensors") else None
                for name, path in paths}

    def create_commit(self, repo_id, operations, **kwargs):
        commits.append((repo_id, contents((op.path_in_repo, op.path_or_fileobj) for op in operations)))
        return COMMIT_URL

    def upload_folder(self, repo_id, folder_path, **kwargs):
        commits.append((repo_id, contents((name, os.path.join(folder_path, name)) for name in os.listdir(folder_path))))
        return COMMIT_URL

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: types.SimpleNamespace(
        repo_id=repo_id, url=f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(transformers.utils.hub, "create_and_tag_model_card", lambda repo_id, tags=None, token=None:
                        ModelCard.from_template(ModelCardData(), model_description="card"))  # no card on the hub yet
    return commits


def test_trainer_push_to_hub_sends_policy_value_head_and_tokenizer(gpt2_dir, tokenizer, hub):
    """TRL: test_push_to_hub (skipped there: it needs the hub), on a recorded hub."""
    trainer = make_trainer(load(gpt2_dir), tokenizer)
    trainer.push_to_hub("me/ppo", commit_message="ppo")
    assert hub and all(repo_id == "me/ppo" for repo_id, _ in hub)
    pushed = {name: keys for _, files in hub for name, keys in files.items()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(pushed)
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= pushed["model.safetensors"]
    assert set(pushed["model.safetensors"]) >= {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"}


def test_trainer_push_to_hub_is_one_commit_with_a_model_card_and_returns_its_url(gpt2_dir, tokenizer, hub):
    """TRL: test_push_to_hub (`url = ppo_trainer.push_to_hub(...)`, then the repo id is read from the URL)."""
    trainer = make_trainer(load(gpt2_dir), tokenizer)
    url = trainer.push_to_hub("me/ppo")
    assert url == COMMIT_URL
    assert len(hub) == 1
    assert {"README.md", "config.json", "model.safetensors", "tokenizer_config.json"} <= set(hub[0][1])
