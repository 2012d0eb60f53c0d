"""PPOTrainer.step and generate on tiny models: behaviour of every config switch."""

import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from conftest import make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

TRL_STEP_KEYS = {
    "objective/kl", "objective/kl_dist", "objective/logprobs", "objective/ref_logprobs", "objective/kl_coef",
    "objective/entropy", "ppo/mean_non_score_reward", "ppo/mean_scores", "ppo/std_scores",
    "tokens/queries_len_mean", "tokens/queries_len_std", "tokens/queries_dist", "tokens/responses_len_mean",
    "tokens/responses_len_std", "tokens/responses_dist", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total",
    "ppo/policy/entropy", "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac",
    "ppo/policy/advantages", "ppo/policy/advantages_mean", "ppo/policy/ratio", "ppo/returns/mean",
    "ppo/returns/var", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var",
    "ppo/val/var_explained", "ppo/learning_rate", "time/ppo/forward_pass", "time/ppo/compute_rewards",
    "time/ppo/compute_advantages", "time/ppo/optimize_step", "time/ppo/calc_stats", "time/ppo/total",
}


def make_trainer(model_dir, tokenizer, ref=True, **config_kwargs):
    config_kwargs.setdefault("batch_size", 4)
    config_kwargs.setdefault("mini_batch_size", 2)
    config_kwargs.setdefault("learning_rate", 1e-3)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir) if ref else None
    return PPOTrainer(PPOConfig(**config_kwargs), model, ref_model, tokenizer)


def snapshot(trainer):
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}


def test_step_on_variable_lengths_returns_trl_stats_and_moves_weights(model_dir, tokenizer):
    trainer = make_trainer(model_dir, tokenizer)
    before = snapshot(trainer)
    stats = trainer.step(*make_batch(tokenizer, 4))
    assert TRL_STEP_KEYS <= set(stats)
    for key, value in stats.items():
        assert np.all(np.isfinite(value)), key
    assert isinstance(stats["objective/kl"], float) and isinstance(stats["objective/logprobs"], np.ndarray)
    assert (stats["objective/logprobs"] <= 0).all()
    after = snapshot(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert stats["fastppo/optimizer_steps"] == 8  # 4 epochs (default) × 2 mini-batches


def test_minibatches_epochs_and_accumulation_count_optimizer_steps(gpt2_dir, tokenizer):
    cases = [
        (dict(batch_size=4, mini_batch_size=2, ppo_epochs=3), 6),
        (dict(batch_size=4, mini_batch_size=1, ppo_epochs=1, gradient_accumulation_steps=2), 2),
        (dict(batch_size=4, mini_batch_size=4, ppo_epochs=2), 2),
    ]
    for kwargs, expected_steps in cases:
        trainer = make_trainer(gpt2_dir, tokenizer, **kwargs)
        stats = trainer.step(*make_batch(tokenizer, 4))
        assert stats["fastppo/optimizer_steps"] == expected_steps, kwargs


def test_adaptive_kl_controller_update(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer, init_kl_coef=0.3, target=0.5, horizon=100.0)
    stats = trainer.step(*make_batch(tokenizer, 4, seed=1))
    assert stats["objective/kl_coef"] == 0.3  # reported before the update, as TRL does
    stats = trainer.step(*make_batch(tokenizer, 4, seed=2))
    kl = stats["objective/kl"]
    error = min(max(kl / 0.5 - 1, -0.2), 0.2)
    assert trainer.kl_ctl.value == pytest.approx(stats["objective/kl_coef"] * (1 + error * 4 / 100.0), rel=1e-12)
    assert stats["objective/kl_coef"] != 0.3  # the first update moved it


def test_fixed_kl_controller_stays(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer, adap_kl_ctrl=False, init_kl_coef=0.05)
    trainer.step(*make_batch(tokenizer, 4))
    trainer.step(*make_batch(tokenizer, 4, seed=3))
    assert trainer.kl_ctl.value == 0.05


@pytest.mark.parametrize("kl_penalty", ["kl", "abs", "mse", "full", "k3"])
def test_every_kl_penalty(gpt2_dir, tokenizer, kl_penalty):
    trainer = make_trainer(gpt2_dir, tokenizer, kl_penalty=kl_penalty)
    batch = make_batch(tokenizer, 4)
    trainer.step(*batch)  # the policy now differs from the reference
    stats = trainer.step(*batch)
    assert math.isfinite(stats["objective/kl"])
    if kl_penalty in ("abs", "mse", "full", "k3"):
        assert (stats["objective/kl_dist"] >= -1e-6).all()
    assert stats["objective/kl"] != 0.0
    # the penalty enters the rewards: mean non-score reward = −kl_coef · masked mean KL
    assert np.sign(stats["ppo/mean_non_score_reward"]) == -np.sign(stats["objective/kl"])


def test_full_kl_is_the_exact_divergence(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer, kl_penalty="full")
    q, r, _ = make_batch(tokenizer, 4)
    padded = trainer._pad_batch(q, r, None)
    ids, am = padded.input_ids, padded.attention_mask
    with torch.no_grad():
        trainer.unwrapped_model.v_head.summary.weight.add_(1.0)  # values move, logits do not
        for p in trainer.unwrapped_model.pretrained_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rollout = trainer._rollout(padded)
    with torch.no_grad():
        p_logits = trainer.unwrapped_model(input_ids=ids, attention_mask=am)[0][:, :-1]
        q_logits = trainer.ref_model(input_ids=ids, attention_mask=am)[0][:, :-1]
    logp, logq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    expected = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(rollout.full_kl.double(), expected, atol=1e-6, rtol=1e-5)


def test_score_scaling_norm_and_clip(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer, use_score_scaling=True, use_score_norm=True, score_clip=0.5)
    q, r, _ = make_batch(tokenizer, 4)
    scores = [torch.tensor(v) for v in (10.0, 20.0, 30.0, 40.0)]
    stats = trainer.step(q, r, scores)
    assert trainer.running.mean == pytest.approx(25.0)
    assert trainer.running.std == pytest.approx(np.std([10, 20, 30, 40], ddof=1), rel=1e-5)
    # normalised to (−1.16, −0.39, 0.39, 1.16), then clipped to ±0.5
    assert stats["ppo/mean_scores"] == pytest.approx(0.0, abs=1e-6)
    assert stats["ppo/std_scores"] == pytest.approx(np.std([-0.5, -0.3873, 0.3873, 0.5], ddof=1), rel=1e-3)


def test_score_scaling_without_norm_divides_by_std(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer, use_score_scaling=True)
    q, r, _ = make_batch(tokenizer, 4)
    stats = trainer.step(q, r, [torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0)])
    assert stats["ppo/mean_scores"] == pytest.approx(2.5 / np.std([1, 2, 3, 4], ddof=1), rel=1e-5)


def test_whitened_rewards_do_not_leak_from_padding(gpt2_dir, tokenizer):
    """Response-token advantages must not depend on how much padding follows (TRL's defect)."""
    trainer = make_trainer(gpt2_dir, tokenizer, whiten_rewards=True)
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    _, adv_short, _ = trainer._compute_advantages(values, rewards, mask)
    pad = torch.zeros(3, 4)
    _, adv_long, _ = trainer._compute_advantages(torch.cat([values, pad], 1), torch.cat([rewards, pad], 1),
                                                 torch.cat([mask, pad.long()], 1))
    torch.testing.assert_close(adv_short[mask.bool()], adv_long[:, :6][mask.bool()])


def test_early_stopping_ends_the_epochs(gpt2_dir, tokenizer):
    # TRL compares the signed policy KL of an epoch's last mini-batch; with a tiny target the
    # first epoch whose KL is positive ends the step (exact epochs: see test_trl_parity).
    trainer = make_trainer(gpt2_dir, tokenizer, early_stopping=True, target_kl=1e-9, ppo_epochs=6)
    stats = trainer.step(*make_batch(tokenizer, 4))
    assert stats["fastppo/early_stopped"] == 1.0
    assert stats["fastppo/optimizer_steps"] in (2, 4, 6, 8, 10)


def test_ratio_threshold_zeroes_the_loss(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer, ratio_threshold=0.5, ppo_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = trainer.step(*make_batch(tokenizer, 4))
    assert stats["fastppo/skipped_minibatches"] == 2
    assert stats["ppo/loss/total"] == 0.0 and stats["ppo/loss/policy"] == 0.0
    assert any("ratio_threshold" in str(w.message) for w in caught)


def test_response_masks_exclude_tokens(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    q, r, s = make_batch(tokenizer, 4, max_response=5)
    r = [torch.cat([x, torch.tensor([7, 8])]) for x in r]
    masks = [torch.cat([torch.ones(len(x) - 2, dtype=torch.long), torch.zeros(2, dtype=torch.long)]) for x in r]
    full_mask = trainer._pad_batch(q, r, None).mask
    partial = trainer._pad_batch(q, r, masks).mask
    assert int(full_mask.sum() - partial.sum()) == 8
    stats = trainer.step(q, r, s, response_masks=masks)
    assert math.isfinite(stats["ppo/loss/total"])


def test_mask_marks_positions_predicting_response_tokens(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    q = [torch.tensor([5, 6, 7]), torch.tensor([5])]
    r = [torch.tensor([8, 9]), torch.tensor([8, 9, 10])]
    padded = trainer._pad_batch(q + q, r + r, None)
    ids, am, mask = padded.input_ids, padded.attention_mask, padded.mask
    assert ids[0].tolist() == [5, 6, 7, 8, 9] and am[0].tolist() == [1, 1, 1, 1, 1]
    assert ids[1].tolist() == [5, 8, 9, 10, tokenizer.pad_token_id]
    assert mask[0].tolist() == [0, 0, 1, 1] and mask[1].tolist() == [1, 1, 1, 0]


def test_learning_rate_scheduler_steps_once_per_step(gpt2_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4), model, None, tokenizer,
                         optimizer=optimizer, lr_scheduler=scheduler)
    assert trainer.step(*make_batch(tokenizer, 4))["ppo/learning_rate"] == pytest.approx(0.1)
    assert trainer.step(*make_batch(tokenizer, 4))["ppo/learning_rate"] == pytest.approx(0.05)


def test_ref_model_none_is_a_frozen_copy(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer, ref=False)
    stats = trainer.step(*make_batch(tokenizer, 4))
    assert stats["objective/kl"] == 0.0  # policy and copy agree on the first rollout
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())


def test_dataset_gives_a_dataloader_of_batch_size(gpt2_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    data = [{"query": torch.tensor([i + 2, i + 3])} for i in range(10)]
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), model, None, tokenizer, dataset=data,
                         data_collator=lambda rows: {"query": [row["query"] for row in rows]})
    batches = list(trainer.dataloader)
    assert len(batches) == 2 and all(len(b["query"]) == 4 for b in batches)


def test_save_state_and_resume(gpt2_dir, tokenizer, tmp_path):
    trainer = make_trainer(gpt2_dir, tokenizer, use_score_scaling=True)
    trainer.step(*make_batch(tokenizer, 4))
    trainer.save_state(tmp_path / "ckpt")
    saved_kl_coef, saved_mean = trainer.kl_ctl.value, trainer.running.mean
    expected = trainer.step(*make_batch(tokenizer, 4, seed=5))

    resumed = make_trainer(gpt2_dir, tokenizer, use_score_scaling=True)
    resumed.load_state(tmp_path / "ckpt")
    assert resumed.kl_ctl.value == saved_kl_coef and resumed.running.mean == saved_mean
    got = resumed.step(*make_batch(tokenizer, 4, seed=5))
    for key in ("objective/kl", "ppo/loss/total", "ppo/mean_scores", "objective/kl_coef"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_trainer_save_pretrained_loads_back(gpt2_dir, tokenizer, tmp_path):
    trainer = make_trainer(gpt2_dir, tokenizer)
    trainer.step(*make_batch(tokenizer, 4))
    trainer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    for key, value in trainer.unwrapped_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_log_stats_without_tracker(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    stats = trainer.step(*make_batch(tokenizer, 4))
    trainer.log_stats(stats, {"query": ["a"] * 4, "response": ["b"] * 4}, [torch.tensor(1.0)] * 4)


def test_log_stats_to_wandb_tables_the_columns_and_refuses_a_missing_one(gpt2_dir, tokenizer, monkeypatch):
    class Table:  # stands in for wandb.Table (wandb is not installed here; accelerate then drops the tracker)
        def __init__(self, columns, rows):
            self.columns, self.rows = columns, rows

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Table=Table))
    trainer = make_trainer(gpt2_dir, tokenizer)
    trainer.config.log_with = "wandb"  # what log_stats reads; a real wandb tracker would need the package
    logged = []
    monkeypatch.setattr(trainer.accelerator, "log", lambda logs, step=None: logged.append(logs))
    stats = {"objective/kl": 0.5}
    batch = {"query": ["q0", "q1"], "response": ["r0", "r1"], "ref_response": ["x0", "x1"]}
    with pytest.raises(ValueError, match=r"columns_to_log: \['ref_rewards'\] not in the batch"):
        trainer.log_stats(stats, batch, [torch.tensor(1.0), torch.tensor(2.0)],
                          columns_to_log=["query", "response", "ref_rewards"])
    assert not logged
    trainer.log_stats(stats, batch, [torch.tensor(1.0), torch.tensor(2.0)], columns_to_log=["query", "ref_response"])
    table = logged[0]["game_log"]
    assert table.columns == ["query", "ref_response", "reward"]
    assert table.rows == [["q0", "x0", 1.0], ["q1", "x1", 2.0]]
    assert logged[0]["env/reward_mean"] == pytest.approx(1.5) and logged[0]["objective/kl"] == 0.5


# --------------------------------------------------------------------------- generate


def test_generate_list_strips_prompt_and_padding(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    queries = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([10, 11])]
    torch.manual_seed(0)
    responses = trainer.generate(queries, return_prompt=False, batch_size=2, max_new_tokens=6, do_sample=True)
    assert len(responses) == 3 and all(r.dim() == 1 and 1 <= len(r) <= 6 for r in responses)
    assert all(tokenizer.pad_token_id not in r.tolist() for r in responses)
    torch.manual_seed(0)
    with_prompt = trainer.generate(queries, batch_size=2, max_new_tokens=6, do_sample=True)
    for query, response, full in zip(queries, responses, with_prompt):
        assert full.tolist() == query.tolist() + response.tolist()


def test_generate_cuts_after_the_first_eos(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    query = [torch.tensor([5, 6])]
    greedy = trainer.generate(query, return_prompt=False, max_new_tokens=6, do_sample=False, eos_token_id=None)
    tokens = greedy[0].tolist()
    assert len(tokens) == 6
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(tokens[2])  # pretend the 3rd token is EOS
    cut = trainer.generate(query, return_prompt=False, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert cut[0].tolist() == tokens[: tokens.index(tokens[2]) + 1]
    kept = trainer.generate(query, return_prompt=False, max_new_tokens=6, do_sample=False, eos_token_id=None,
                            remove_padding=False)
    assert kept[0].tolist() == tokens


def test_generate_single_query_returns_2d(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    out = trainer.generate(torch.tensor([5, 6, 7]), return_prompt=False, max_new_tokens=4, do_sample=False)
    assert out.dim() == 2 and out.shape[0] == 1 and out.shape[1] <= 4
    response, ref_response = trainer.generate(torch.tensor([5, 6, 7]), max_new_tokens=3, do_sample=False,
                                              generate_ref_response=True)
    torch.testing.assert_close(response, ref_response)  # untrained policy = reference


def test_generate_length_sampler(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    out = trainer.generate([torch.tensor([5, 6])] * 2, length_sampler=lambda: 3, return_prompt=False,
                           do_sample=True, eos_token_id=None)
    assert all(len(r) == 3 for r in out)


def test_generate_leaves_the_model_mode_alone(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    trainer.unwrapped_model.train()
    trainer.generate([torch.tensor([5])], max_new_tokens=2)
    assert trainer.unwrapped_model.training


def test_optimize_device_cache_clears_after_each_pass(gpt2_dir, tokenizer, monkeypatch):
    import fastppo.training.forward_plan as forward_plan_module

    calls = []
    monkeypatch.setattr(forward_plan_module, "clear_device_cache", lambda garbage_collection: calls.append(1))
    trainer = make_trainer(gpt2_dir, tokenizer, optimize_device_cache=True, ppo_epochs=1)
    trainer.step(*make_batch(tokenizer, 4))
    assert len(calls) == 2 + 2  # two rollout chunks, two mini-batches
    make_trainer(gpt2_dir, tokenizer, ppo_epochs=1).step(*make_batch(tokenizer, 4))
    assert len(calls) == 4  # off by default


def test_num_shared_layers_trains_only_the_unshared_part(gpt2_dir, tokenizer):
    """The trainer's reference shares the frozen layers; the optimizer sees only the rest; a step
    moves the rest and leaves the shared tensors (used by both models) as they were."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-2), model, None, tokenizer,
                         num_shared_layers=1)
    shared = [p for p in model.parameters() if not p.requires_grad]
    ref_ids = {id(p) for p in trainer.ref_model.parameters()}
    assert shared and all(id(p) in ref_ids for p in shared)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.step(*make_batch(tokenizer, 4))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (not p.requires_grad), name


def test_num_shared_layers_is_ignored_with_a_given_reference(gpt2_dir, tokenizer):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    with pytest.warns(UserWarning, match="num_shared_layers is ignored: a ref_model was given"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), model, ref_model, tokenizer, num_shared_layers=1)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("compare_steps, pushed_at", [(1, [0, 3, 4]), (2, [0, 4])])
def test_push_to_hub_if_best(gpt2_dir, tokenizer, monkeypatch, tmp_path, compare_steps, pushed_at):
    """TRL's rule: every `compare_steps` steps, push when the batch's mean score beats every one compared
    before; the push carries the configured kwargs (what it sends: tests/trl/test_trl_port.py). The record survives
    save_state / load_state."""
    kwargs = {"repo_id": "me/policy", "private": True}
    trainer = make_trainer(gpt2_dir, tokenizer, push_to_hub_if_best_kwargs=kwargs, compare_steps=compare_steps)
    pushes, step = [], [0]
    monkeypatch.setattr(trainer, "push_to_hub", lambda repo_id, **kw: pushes.append(("trainer", step[0], repo_id, kw)))
    queries, responses, _ = make_batch(tokenizer, 4)
    # compare_steps=1: bests at steps 0, 3, 4; compare_steps=2 looks at steps 0, 2 and 4 only
    for step[0], mean in enumerate([1.0, 0.5, 0.8, 2.0, 3.0]):
        trainer.step(queries, responses, [torch.tensor(mean)] * 4)
        if step[0] == 2:
            trainer.save_state(tmp_path / "ckpt")
    assert [p[1] for p in pushes] == pushed_at  # one upload of model, tokenizer and card each time
    assert all(p[2:] == ("me/policy", {"private": True}) for p in pushes)
    resumed = make_trainer(gpt2_dir, tokenizer, push_to_hub_if_best_kwargs=kwargs, compare_steps=compare_steps)
    resumed.load_state(tmp_path / "ckpt")
    assert resumed.highest_reward == 1.0 and resumed._compare_step == 3


def test_push_to_hub_if_best_needs_a_repo_id():
    with pytest.raises(ValueError, match="push_to_hub_if_best_kwargs must name the repository"):
        PPOConfig(push_to_hub_if_best_kwargs={"private": True})


class ColumnDataset(torch.utils.data.Dataset):
    """What the dataloader uses of a Hugging Face `datasets.Dataset`: rows, column_names, remove_columns."""

    def __init__(self, columns: dict):
        self.columns = columns

    @property
    def column_names(self):
        return list(self.columns)

    def remove_columns(self, names):
        return ColumnDataset({k: v for k, v in self.columns.items() if k not in names})

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index):
        return {k: v[index] for k, v in self.columns.items()}


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_dataloader_drops_columns_the_model_does_not_take(gpt2_dir, tokenizer, remove_unused_columns):
    """TRL's rule for a `datasets.Dataset`: keep the model forward's arguments and label/query/response."""
    data = ColumnDataset({"input_ids": [torch.tensor([i + 2, i + 3]) for i in range(8)],
                          "query": [f"q{i}" for i in range(8)], "review": [f"text {i}" for i in range(8)],
                          "label": list(range(8))})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, remove_unused_columns=remove_unused_columns),
                         model, None, tokenizer, dataset=data,
                         data_collator=lambda rows: {key: [row[key] for row in rows] for key in rows[0]})
    batch = next(iter(trainer.dataloader))
    expected = {"input_ids", "query", "label"} | ({"review"} if not remove_unused_columns else set())
    assert set(batch) == expected and len(batch["query"]) == 4


def test_num_shared_layers_refused_where_policy_and_reference_are_sharded_apart(gpt2_dir, tokenizer, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    with pytest.raises(ValueError, match="num_shared_layers: FSDP shards"):
        PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), model, None, tokenizer, num_shared_layers=1)
    assert all(p.requires_grad for p in model.parameters())
