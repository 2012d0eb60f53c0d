"""TRL 0.11.4's value-head model surface: attributes, post_init, quantisation flags, the PEFT reward adapter,
and PEFT checkpoints both ways (TRL-written fixtures in tests/data/trl_peft, see its README)."""

import importlib.metadata
import json
import logging
import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

import fastppo.models.wrapper
from conftest import make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, PreTrainedModelWrapper, ValueHead
from tolerances import tol

peft = pytest.importorskip("peft")

DATA = Path(__file__).parents[1] / "data"
BASE = DATA / "trl_parity" / "init"  # the base model of every trl_peft fixture
FP32 = tol(torch.float32)


pytestmark = pytest.mark.usefixtures("single_thread")  # as TRL's numbers were recorded


@pytest.fixture()
def trl_peft(tmp_path):
    """A copy of tests/data/trl_peft whose adapter configs name the base model by this checkout's absolute
    path (the fixtures store it relative to the repository root; tests may run from anywhere)."""
    folder = shutil.copytree(DATA / "trl_peft", tmp_path / "trl_peft")
    for adapter in ("policy", "reward_adapter"):
        path = folder / adapter / "adapter_config.json"
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = str(BASE)
        path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def expected():
    return load_file(DATA / "trl_peft" / "expected.safetensors")


def lora(task_type="CAUSAL_LM", **overrides):
    """The LoRA settings of the fixtures (make_fixtures.py)."""
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True,
                    task_type=task_type, init_lora_weights=False)
    return peft.LoraConfig(**{**settings, **overrides})


def outputs(model, expected):
    with torch.no_grad():
        logits, _, values = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])
    return logits, values


# ---------------------------------------------------------------------------------------------- surface


def test_class_and_instance_attributes_as_trl(gpt2_dir):
    cls = AutoModelForCausalLMWithValueHead
    assert cls.lm_head_namings == ["lm_head", "embed_out"]
    assert cls.supported_args == ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")
    assert cls.supported_modules == ("v_head",) and cls.supported_rm_modules == ("score",)
    assert cls.transformers_parent_class is AutoModelForCausalLM and issubclass(cls, PreTrainedModelWrapper)
    model = cls.from_pretrained(gpt2_dir)
    assert model.v_head.summary.weight.shape == (1, model.config.n_embd)
    assert not torch.all(model.v_head.summary.bias == 0)  # nn.Linear's random init by default, as TRL
    assert (model.is_peft_model, model.is_loaded_in_8bit, model.is_loaded_in_4bit, model.is_sequential_parallel,
            model.supports_rm_adapter, model.rm_adapter_name, model.policy_adapter_name) == (
        False, False, False, False, False, None, "default")
    assert model.current_device == (0 if torch.cuda.is_available() else "cpu")
    assert model.config is model.pretrained_model.config
    ids = torch.tensor([[5, 6, 7]])
    assert model.prepare_inputs_for_generation(ids)["input_ids"].equal(ids)
    model.enable_input_require_grads()
    assert len(model(ids)) == 3  # (lm_logits, loss, value)
    with pytest.raises(ValueError, match="reward adapter"):
        model.compute_reward_score(ids)
    with pytest.raises(NotImplementedError, match="post_init"):
        PreTrainedModelWrapper(model.pretrained_model).post_init({})


def test_value_head_dropout_from_config_or_argument(gpt2_dir):
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    base.config.summary_dropout_prob = 0.5
    assert AutoModelForCausalLMWithValueHead.from_pretrained(base).v_head.dropout.p == 0.5
    # the argument wins over the config (TRL lets the config win)
    assert AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, summary_dropout_prob=0.3).v_head.dropout.p == 0.3
    head = ValueHead(base.config)  # TRL's signature; ValueHead(hidden_size) works too
    assert head.summary.in_features == ValueHead(base.config.n_embd).summary.in_features == base.config.n_embd
    assert isinstance(ValueHead(8, summary_dropout_prob=None).dropout, torch.nn.Identity)


def test_post_init_loads_the_value_head_and_ignores_other_keys(gpt2_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    weight, bias = torch.randn(1, model.config.n_embd), torch.randn(1)
    old_embedding = model.pretrained_model.transformer.wte.weight.clone()
    model.post_init({"v_head.summary.weight": weight, "v_head.summary.bias": bias,
                     "transformer.wte.weight": torch.zeros_like(old_embedding)})
    assert model.v_head.summary.weight.equal(weight) and model.v_head.summary.bias.equal(bias)
    assert model.pretrained_model.transformer.wte.weight.equal(old_embedding)
    model.post_init({"v_head.summary.bias": -bias})  # non-strict, as TRL: a partial head loads what it has
    assert model.v_head.summary.bias.equal(-bias) and model.v_head.summary.weight.equal(weight)


def test_init_weights_normal_strategy(gpt2_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    model._init_weights(v_head_init_strategy="normal", v_head_initializer_range=1e-3)
    assert model.v_head.summary.bias.eq(0).all() and model.v_head.summary.weight.abs().max() < 1e-2


def test_bad_loading_arguments_name_the_argument(gpt2_dir):
    load = AutoModelForCausalLMWithValueHead.from_pretrained
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        load(42)
    with pytest.raises(ValueError, match="peft_config"):
        load(gpt2_dir, peft_config={"r": 4})
    with pytest.raises(ValueError, match="peft_config: prompt-learning"):
        load(gpt2_dir, peft_config=peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


# ---------------------------------------------------------------------------------------------- quantisation


class _RecordingParent:
    """A transformers_parent_class that records the kwargs it is given and loads the model without them."""

    seen = {}

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        cls.seen = dict(kwargs)
        return AutoModelForCausalLM.from_pretrained(path)


class _Recording(AutoModelForCausalLMWithValueHead):
    transformers_parent_class = _RecordingParent


def test_quantisation_flags_become_a_bitsandbytes_config(gpt2_dir, monkeypatch):
    monkeypatch.setattr(fastppo.models.wrapper, "_bitsandbytes_installed", lambda: True)
    # transformers 4.46's BitsAndBytesConfig(load_in_4bit=True) reads bitsandbytes' installed version itself
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.44.1" if name == "bitsandbytes" else real_version(name))
    kbit_calls = []

    def prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=None):
        kbit_calls.append({"use_gradient_checkpointing": use_gradient_checkpointing})
        return model

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare_model_for_kbit_training)
    _Recording.from_pretrained(gpt2_dir, load_in_8bit=True)
    config = _RecordingParent.seen["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_8bit and not config.load_in_4bit
    assert _RecordingParent.seen["device_map"] == {"": "cpu" if not torch.cuda.is_available() else 0}
    assert "load_in_8bit" not in _RecordingParent.seen and not kbit_calls  # no adapter: nothing to prepare

    model = _Recording.from_pretrained(gpt2_dir, load_in_4bit=True, device_map="auto", peft_config=lora(),
                                       use_gradient_checkpointing=False)
    config = _RecordingParent.seen["quantization_config"]
    assert config.load_in_4bit and _RecordingParent.seen["device_map"] == "auto"
    assert kbit_calls == [{"use_gradient_checkpointing": False}] and model.is_peft_model
    assert "use_gradient_checkpointing" not in _RecordingParent.seen


def test_quantisation_flags_are_refused_clearly(gpt2_dir, monkeypatch):
    if not fastppo.models.wrapper._bitsandbytes_installed():
        with pytest.raises(ImportError, match="load_in_8bit=True .* bitsandbytes"):
            AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, load_in_8bit=True)
    monkeypatch.setattr(fastppo.models.wrapper, "_bitsandbytes_installed", lambda: True)
    with pytest.raises(ValueError, match="load_in_8bit and load_in_4bit"):
        AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="load_in_4bit=True and quantization_config"):
        AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, load_in_4bit=True,
                                                          quantization_config=BitsAndBytesConfig(load_in_8bit=True))


def test_quantised_and_dispatched_models_are_flagged(gpt2_dir):
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    base.is_loaded_in_8bit = True  # what transformers' bitsandbytes quantiser sets
    assert AutoModelForCausalLMWithValueHead.from_pretrained(base).is_loaded_in_8bit
    # transformers records the placement of a model dispatched over several devices (here faked on one)
    dispatched = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    dispatched.hf_device_map = {"transformer": "cpu", "lm_head": "cpu"}
    assert AutoModelForCausalLMWithValueHead.from_pretrained(dispatched).is_sequential_parallel
    offloaded = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    offloaded.hf_device_map = {"transformer": 0, "lm_head": "disk"}
    with pytest.raises(ValueError, match="device_map offloads"):
        AutoModelForCausalLMWithValueHead(offloaded)


# ---------------------------------------------------------------------------------------------- TRL's PEFT checkpoints


def test_trl_peft_checkpoint_loads_with_trl_numbers(trl_peft, expected):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(trl_peft / "policy", attn_implementation="eager").eval()
    assert model.is_peft_model and not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(model.v_head.summary.weight, expected["v_head.summary.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.v_head.summary.bias, expected["v_head.summary.bias"], rtol=0, atol=0)
    logits, values = outputs(model, expected)
    torch.testing.assert_close(logits, expected["logits"], **FP32)
    torch.testing.assert_close(values, expected["values"], **FP32)


def test_a_moved_checkpoint_names_its_missing_base(tmp_path, monkeypatch):
    shutil.copytree(DATA / "trl_peft" / "policy", tmp_path / "policy")  # its base path is relative to the repo
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="adapter_config.json names the base model 'tests/data/trl_parity/init'"):
        AutoModelForCausalLMWithValueHead.from_pretrained("policy")


@pytest.mark.parametrize("how", ["saved policy", "new adapter", "built model"])
def test_reward_adapter_scores_as_trl(trl_peft, expected, how):
    reward_adapter = trl_peft / "reward_adapter"
    if how == "saved policy":
        model = AutoModelForCausalLMWithValueHead.from_pretrained(trl_peft / "policy", reward_adapter=reward_adapter,
                                                                  attn_implementation="eager", is_trainable=True)
    else:
        source = BASE if how == "new adapter" else AutoModelForCausalLM.from_pretrained(BASE,
                                                                                        attn_implementation="eager")
        model = AutoModelForCausalLMWithValueHead.from_pretrained(source, peft_config=lora(),
                                                                  attn_implementation="eager",
                                                                  reward_adapter=str(reward_adapter),
                                                                  reward_adapter_name="rm")
    assert model.supports_rm_adapter and model.policy_adapter_name == "default"
    assert model.rm_adapter_name == ("reward_adapter" if how == "saved policy" else "rm")
    assert not any(p.requires_grad for p in model.score.parameters())
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = outputs(model.eval(), expected)
    model.train()
    scores = model.compute_reward_score(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])
    torch.testing.assert_close(scores, expected["reward_scores"], **FP32)
    # the policy adapter is active again, nothing became trainable or frozen, the mode is kept
    assert model.pretrained_model.active_adapter == "default" and model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for got, want in zip(outputs(model.eval(), expected), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if how == "saved policy":
        torch.testing.assert_close(before[1], expected["values"], **FP32)


def test_add_and_load_reward_modeling_adapter_as_trl(trl_peft, expected):
    """TRL's classmethod: load the reward adapter into a PEFT model, return its frozen score head."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(BASE, peft_config=lora(), attn_implementation="eager")
    peft_model = model.pretrained_model.train()
    score = AutoModelForCausalLMWithValueHead.add_and_load_reward_modeling_adapter(
        peft_model, trl_peft / "reward_adapter")
    assert isinstance(score, torch.nn.Linear) and not any(p.requires_grad for p in score.parameters())
    assert "reward_model_adapter" in peft_model.peft_config and peft_model.active_adapter == "default"
    assert peft_model.training  # the mode it had (PEFT's load_adapter switches to eval)
    rm_lora = [p for n, p in peft_model.named_parameters() if "lora_" in n and "reward_model_adapter" in n]
    assert rm_lora and not any(p.requires_grad for p in rm_lora)
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(BASE, peft_config=lora(), attn_implementation="eager",
                                                               reward_adapter=trl_peft / "reward_adapter")
    assert score.weight.equal(loaded.score.weight) and score.weight.dtype == loaded.score.weight.dtype
    # the wrapper built with that head scores as TRL
    model = AutoModelForCausalLMWithValueHead(peft_model, score_module=score, supports_rm_adapter=True,
                                              rm_adapter_name="reward_model_adapter")
    scores = model.compute_reward_score(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])
    torch.testing.assert_close(scores, expected["reward_scores"], **FP32)

    add = AutoModelForCausalLMWithValueHead.add_and_load_reward_modeling_adapter
    with pytest.raises(TypeError, match="pretrained_model must be a peft.PeftModel"):
        add(AutoModelForCausalLM.from_pretrained(BASE), trl_peft / "reward_adapter")
    with pytest.raises(ValueError, match="adapter_model_id='/nonexistent/rm': no adapter_config.json"):
        add(peft_model, "/nonexistent/rm", "rm2")
    with pytest.raises(ValueError, match="adapter_name='reward_model_adapter' is already"):
        add(peft_model, trl_peft / "reward_adapter")


def test_supported_architectures_and_current_device():
    architectures = AutoModelForCausalLMWithValueHead.supported_pretrained_model_architectures
    assert architectures == (PreTrainedModel, peft.PeftModelForCausalLM, peft.PeftModelForSeq2SeqLM)  # TRL's
    assert PreTrainedModelWrapper._get_current_device() == (0 if torch.cuda.is_available() else "cpu")


def test_reward_adapter_bad_input_names_the_argument(trl_peft, gpt2_dir):
    load = AutoModelForCausalLMWithValueHead.from_pretrained
    reward_adapter = trl_peft / "reward_adapter"
    with pytest.raises(ValueError, match="reward_adapter needs a PEFT policy"):
        load(BASE, reward_adapter=reward_adapter)
    with pytest.raises(ValueError, match="reward_adapter must be a local path"):
        load(BASE, peft_config=lora(), reward_adapter=3)
    with pytest.raises(ValueError, match="reward_adapter='/nonexistent/rm': no adapter_config.json"):
        load(BASE, peft_config=lora(), reward_adapter="/nonexistent/rm")
    with pytest.raises(ValueError, match="reward_adapter=.*no score head"):
        load(BASE, peft_config=lora(), reward_adapter=trl_peft / "policy")  # an adapter, but not a reward model's
    with pytest.raises(ValueError, match="reward_adapter_name='default'"):
        load(BASE, peft_config=lora(), reward_adapter=reward_adapter, reward_adapter_name="default")


def test_peft_config_is_ignored_for_a_saved_adapter(trl_peft, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="fastppo.models.wrapper"):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(trl_peft / "policy", peft_config=lora(r=8),
                                                                  attn_implementation="eager").eval()
    assert "peft_config ignored" in caplog.text and model.pretrained_model.peft_config["default"].r == 4
    torch.testing.assert_close(outputs(model, expected)[1], expected["values"], **FP32)


# ------------------------------------------------------------------------------------------- fastppo's PEFT checkpoints


def _tensor_layout(path):
    state = load_file(path) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def test_fastppo_peft_checkpoint_has_trl_files_and_keys(trl_peft, expected, tmp_path):
    """What TRL 0.11.4 reads (tests/data/trl_peft/check_fastppo_checkpoint.py loads such a checkpoint in TRL)."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(BASE, peft_config=lora(), attn_implementation="eager",
                                                              reward_adapter=trl_peft / "reward_adapter").eval()
    ours, trls = tmp_path / "ours", trl_peft / "policy"
    model.save_pretrained(ours)
    assert sorted(os.listdir(ours)) == sorted(os.listdir(trls))  # no reward-adapter subfolder either
    for name in ("pytorch_model.bin", "adapter_model.safetensors"):
        assert _tensor_layout(ours / name) == _tensor_layout(trls / name), name
    # every setting a PEFT of TRL 0.11's time knows, and the same values where it matters
    config, trl_config = (json.loads((folder / "adapter_config.json").read_text()) for folder in (ours, trls))
    assert set(config) <= set(trl_config)
    for key in ("peft_type", "task_type", "r", "target_modules", "fan_in_fan_out", "base_model_name_or_path"):
        assert config.get(key, trl_config[key]) == trl_config[key], key

    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(ours, attn_implementation="eager").eval()
    assert reloaded.pretrained_model.peft_config["default"].lora_alpha == 8  # left-out defaults come back
    for got, want in zip(outputs(reloaded, expected), outputs(model, expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_older_fastppo_peft_checkpoint_still_loads(trl_peft, tmp_path):
    """fastppo once wrote a PEFT policy's head to v_head.safetensors: read it, and replace it when saving over it."""
    from safetensors.torch import save_file

    folder = shutil.copytree(trl_peft / "policy", tmp_path / "old")
    head = torch.load(folder / "pytorch_model.bin", weights_only=True)
    os.remove(folder / "pytorch_model.bin")
    save_file(head, folder / "v_head.safetensors")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(folder)
    torch.testing.assert_close(model.v_head.summary.weight, head["v_head.summary.weight"], rtol=0, atol=0)
    model.save_pretrained(folder)
    assert "v_head.safetensors" not in os.listdir(folder) and "pytorch_model.bin" in os.listdir(folder)


def test_peft_push_to_hub_uploads_the_value_head_too(trl_peft, monkeypatch):
    import huggingface_hub

    pushed = {}

    def upload_folder(self, repo_id, folder_path, **kwargs):
        pushed.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)), **kwargs)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(trl_peft / "policy")
    model.push_to_hub("me/policy", commit_message="ppo", tags=["rl"])
    assert pushed["repo_id"] == "me/policy" and pushed["commit_message"] == "ppo"
    assert pushed["files"] == sorted(os.listdir(trl_peft / "policy"))


# ---------------------------------------------------------------------------------------------- in the trainer


def test_trainer_steps_a_policy_with_a_reward_adapter(trl_peft):
    """TRL's multi-adapter loop: score with the reward adapter, step the policy; the reward model stays put."""
    tokenizer = AutoTokenizer.from_pretrained(DATA / "trl_parity" / "tokenizer")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(BASE, peft_config=lora(init_lora_weights=True),
                                                              reward_adapter=trl_peft / "reward_adapter",
                                                              attn_implementation="eager")
    frozen = {n: p.clone() for n, p in model.named_parameters() if "reward_adapter" in n or n.startswith("score.")}
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=1, learning_rate=1e-2), model, None, tokenizer)
    queries, responses, _ = make_batch(tokenizer, 2)
    rows = [torch.cat([q, r]) for q, r in zip(queries, responses)]
    scores = [model.compute_reward_score(row[None])[0, -1, 0] for row in rows]
    stats = trainer.step(queries, responses, scores)
    assert stats["objective/kl"] == 0.0 and model.pretrained_model.active_adapter == "default"
    assert all(p.equal(frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not p.eq(0).all() for n, p in model.named_parameters() if "lora_B.default" in n)  # the policy moved
