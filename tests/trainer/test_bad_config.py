"""Bad configuration is refused at construction, naming the field, argument or file: PPOConfig values,
value-head arguments, and corrupt or truncated checkpoint files given to `from_pretrained`."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, ValueHead

BAD_CONFIG = {
    # field: (kwargs, message)
    "steps None": (dict(steps=None), "steps must be a non-negative integer, got None"),
    "seed as a string": (dict(seed="0"), "seed must be an integer in"),
    "negative seed": (dict(seed=-1), "seed must be an integer in"),
    "seed numpy cannot take": (dict(seed=2**32), "seed must be an integer in"),
    "float batch_size": (dict(batch_size=8.0), "batch_size must be a positive integer, got 8.0"),
    "bool batch_size": (dict(batch_size=True), "batch_size must be a positive integer, got True"),
    "negative ppo_epochs": (dict(ppo_epochs=-1), "ppo_epochs must be a positive integer"),
    "None mini_batch_size": (dict(mini_batch_size=None), "mini_batch_size must be a positive integer, got None"),
    "float forward_batch_size": (dict(forward_batch_size=2.5), "forward_batch_size must be a positive integer or None"),
    "zero world_size": (dict(world_size=0), "world_size must be a positive integer or None"),
    "zero dataset_num_proc": (dict(dataset_num_proc=0), "dataset_num_proc must be a positive integer or None"),
    "string learning_rate": (dict(learning_rate="1e-5"), "learning_rate must be a non-negative number, got '1e-5'"),
    "bool learning_rate": (dict(learning_rate=True), "learning_rate must be a non-negative number"),
    "string init_kl_coef": (dict(init_kl_coef="0.2"), "init_kl_coef must be a non-negative number, got '0.2'"),
    "None init_kl_coef": (dict(init_kl_coef=None), "init_kl_coef must be a non-negative number, got None"),
    "inf gamma": (dict(gamma=float("inf")), "gamma must be a number in"),
    "-inf cliprange": (dict(cliprange=float("-inf")), "cliprange must be a non-negative number, got -inf"),
    "NaN gamma": (dict(gamma=float("nan")), "gamma must be a number in"),
    "int too large for a float": (dict(horizon=10**400), "horizon must be a positive number"),
    "string max_grad_norm": (dict(max_grad_norm="1.0"), "max_grad_norm must be a positive number or None"),
    "inf init_kl_coef": (dict(init_kl_coef=float("inf")), "init_kl_coef must be a non-negative number, got inf"),
    "bool dual_clip": (dict(dual_clip=True), "dual_clip must be a number > 1 or None"),
    "string bool": (dict(early_stopping="False"), "early_stopping must be True or False, got 'False'"),
    "int bool": (dict(adap_kl_ctrl=1), "adap_kl_ctrl must be True or False"),
    "string optimize_cuda_cache": (dict(optimize_cuda_cache="no"), "optimize_cuda_cache must be True or False or None"),
    "None exp_name": (dict(exp_name=None), "exp_name must be a string, got None"),
    "int model_name": (dict(model_name=3), "model_name must be a string"),
    "None kl_penalty": (dict(kl_penalty=None), "kl_penalty must be one of"),
    "list backend": (dict(backend=["torch"]), "backend must be one of"),
    "list accelerator_kwargs": (dict(accelerator_kwargs=[("cpu", True)]), "accelerator_kwargs must be a dict"),
    "non-string key": (dict(project_kwargs={1: "x"}), "project_kwargs must be a dict with string keys"),
    "accelerator_kwargs the trainer sets": (dict(accelerator_kwargs={"gradient_accumulation_steps": 4}),
                                            "accelerator_kwargs must not set 'gradient_accumulation_steps'.*"
                                            "PPOConfig.gradient_accumulation_steps"),
    "unknown accelerator_kwargs": (dict(accelerator_kwargs={"cpus": True}),
                                   "accelerator_kwargs: 'cpus' is not an argument of accelerate.Accelerator"),
    "unknown project_kwargs": (dict(project_kwargs={"log_dir": "x"}), "project_kwargs: 'log_dir' is not a field"),
    "tracker_kwargs not per tracker": (dict(tracker_kwargs={"entity": "me"}),
                                       "tracker_kwargs maps a tracker name to its init kwargs"),
    "string tracker_kwargs": (dict(tracker_kwargs="wandb"), "tracker_kwargs must be a dict"),
    "repo_id None": (dict(push_to_hub_if_best_kwargs={"repo_id": None}), "push_to_hub_if_best_kwargs must name"),
    "vllm_kwargs without vllm": (dict(vllm_kwargs={"dtype": "bfloat16"}), "vllm_kwargs is set but rollout_engine='hf'"),
    "unknown tracker": (dict(log_with="wandbb"), "log_with must be None, one of"),
    "tracker list with a number": (dict(log_with=["tensorboard", 3]), "log_with must be None, one of"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config_value_is_refused_naming_the_field(case):
    kwargs, message = BAD_CONFIG[case]
    with pytest.raises(ValueError, match=f"PPOConfig.{message}"):
        PPOConfig(**kwargs)


def test_log_with_a_tracker_that_is_not_installed_is_refused():
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    missing = [t.value for t in LoggerType if t.value != "all" and t not in get_available_trackers()]
    if not missing:
        pytest.skip("every tracker is installed here")
    with pytest.raises(ImportError, match=f"PPOConfig.log_with='{missing[0]}': the {missing[0]} package"):
        PPOConfig(log_with=missing[0])


@pytest.mark.parametrize("kwargs", [
    dict(batch_size=np.int64(8), mini_batch_size=np.int32(4), learning_rate=np.float32(1e-3), seed=2**32 - 1),
    dict(learning_rate=1, init_kl_coef=0, cliprange=0, steps=0, gamma=1),
    dict(max_grad_norm=None, score_clip=None, dual_clip=None, forward_batch_size=None, log_with=None, task_name=None),
    dict(accelerator_kwargs={"cpu": True, "mixed_precision": "no"}, project_kwargs={"logging_dir": "logs"},
         tracker_kwargs={"wandb": {"entity": "me"}}, push_to_hub_if_best_kwargs={"repo_id": "me/model"}),
    dict(rollout_engine="vllm", vllm_kwargs={"max_model_len": 64}, rollout_correction="tis"),
    # +inf as "never", where TRL takes it so: no clipping, no ratio guard, no early stop
    dict(cliprange_value=float("inf"), max_grad_norm=float("inf"), ratio_threshold=float("inf"),
         target_kl=float("inf"), score_clip=float("inf")),
])
def test_good_config_values_are_accepted(kwargs):
    config = PPOConfig(**kwargs)
    assert dataclasses.replace(config) == config and config.to_dict()


def test_none_for_a_kwargs_dict_means_empty_as_trl_optional_dict():
    config = PPOConfig(tracker_kwargs=None, accelerator_kwargs=None, project_kwargs=None,
                       push_to_hub_if_best_kwargs=None, vllm_kwargs=None)
    assert config.tracker_kwargs == config.accelerator_kwargs == config.project_kwargs == {}
    assert config.push_to_hub_if_best_kwargs == config.vllm_kwargs == {}


# --------------------------------------------------------------------------- value-head arguments

BAD_VALUE_HEAD_KWARGS = [
    (dict(summary_dropout_prob="0.1"), TypeError, "summary_dropout_prob must be a number in"),
    (dict(summary_dropout_prob=True), TypeError, "summary_dropout_prob must be a number in"),
    (dict(summary_dropout_prob=1.0), ValueError, r"summary_dropout_prob must be a number in \[0, 1\)"),
    (dict(summary_dropout_prob=-0.1), ValueError, "summary_dropout_prob must be a number in"),
    (dict(summary_dropout_prob=float("nan")), ValueError, "summary_dropout_prob must be a number in"),
    (dict(v_head_initializer_range="0.2"), TypeError, "v_head_initializer_range must be a positive number"),
    (dict(v_head_initializer_range=0.0), ValueError, "v_head_initializer_range must be a positive number"),
    (dict(v_head_initializer_range=float("inf")), ValueError, "v_head_initializer_range must be a positive number"),
    (dict(v_head_init_strategy="xavier"), ValueError, "v_head_init_strategy must be None or 'normal'"),
    (dict(v_head_init_strategy=True), ValueError, "v_head_init_strategy must be None or 'normal'"),
    (dict(v_head_init_stratgy="normal"), TypeError, "unexpected value-head argument.*'v_head_init_stratgy'"),
]


@pytest.mark.parametrize("how", ["from_pretrained", "constructor"])
@pytest.mark.parametrize("kwargs,error,message", BAD_VALUE_HEAD_KWARGS)
def test_bad_value_head_argument_is_refused_naming_it(gpt2_dir, how, kwargs, error, message):
    with pytest.raises(error, match=message):
        if how == "from_pretrained":
            AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, **kwargs)
        else:
            AutoModelForCausalLMWithValueHead(AutoModelForCausalLM.from_pretrained(gpt2_dir), **kwargs)


def test_bad_value_head_argument_is_refused_before_the_model_passed_in_is_touched(gpt2_dir):
    from peft import LoraConfig

    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    names = [name for name, _ in base.named_modules()]
    with pytest.raises(TypeError, match="summary_dropout_prob"):
        AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=LoraConfig(r=2, target_modules=["c_attn"]),
                                                          summary_dropout_prob="0.1")
    assert [name for name, _ in base.named_modules()] == names  # no LoRA layers injected


def test_value_head_none_arguments_mean_the_defaults(gpt2_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, summary_dropout_prob=None,
                                                              v_head_init_strategy="normal", v_head_initializer_range=None)
    assert isinstance(model.v_head.dropout, torch.nn.Identity) and model.v_head.summary.bias.abs().max() == 0
    with pytest.raises(TypeError, match="summary_dropout_prob"):
        ValueHead(8, summary_dropout_prob="0.1")


# --------------------------------------------------------------------------- corrupt checkpoint files


@pytest.fixture(scope="module")
def checkpoints(model_dirs, tmp_path_factory):
    """{layout: directory}: one value-head checkpoint per file layout `from_pretrained` reads."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("checkpoints")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dirs["gpt2"])
    model.save_pretrained(root / "safetensors")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    shutil.copytree(root / "safetensors", root / "bin")
    os.remove(root / "bin" / "model.safetensors")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, root / "bin" / "pytorch_model.bin")
    shutil.copytree(model_dirs["gpt2"], root / "legacy")  # base weights alone, the head in v_head.safetensors
    from safetensors.torch import save_file
    save_file({f"v_head.{k}": v.contiguous() for k, v in model.v_head.state_dict().items()},
              str(root / "legacy" / "v_head.safetensors"))
    peft = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_dirs["gpt2"], peft_config=LoraConfig(r=2, target_modules=["c_attn"]))
    peft.save_pretrained(root / "peft")
    return {path.name: path for path in root.iterdir()}


def _last_shard(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))[-1]


CORRUPT_FILES = [
    # (layout, file (a function of the directory for the shard), how it is broken)
    ("safetensors", "model.safetensors", "truncated"),
    ("safetensors", "model.safetensors", "garbage"),
    ("bin", "pytorch_model.bin", "truncated"),
    ("bin", "pytorch_model.bin", "empty"),
    ("sharded", _last_shard, "truncated"),
    ("sharded", "model.safetensors.index.json", "garbage"),
    ("legacy", "v_head.safetensors", "truncated"),
    ("peft", "adapter_model.safetensors", "truncated"),
    ("peft", "adapter_config.json", "truncated"),
    ("peft", "pytorch_model.bin", "truncated"),  # the PEFT policy's value head, where TRL writes it
    ("peft", "pytorch_model.bin", "garbage"),
]


@pytest.mark.parametrize("layout,file,how", CORRUPT_FILES)
def test_corrupt_checkpoint_file_is_named(checkpoints, tmp_path, layout, file, how):
    directory = shutil.copytree(checkpoints[layout], tmp_path / layout)
    name = file(directory) if callable(file) else file
    data = (directory / name).read_bytes()
    (directory / name).write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not a checkpoint " * 8,
                                    "empty": b""}[how])
    with pytest.raises(OSError, match=f"{directory / name}: cannot be read, the file is corrupt or truncated"):
        AutoModelForCausalLMWithValueHead.from_pretrained(directory)


def test_intact_checkpoints_still_load(checkpoints):
    for directory in checkpoints.values():
        AutoModelForCausalLMWithValueHead.from_pretrained(directory)


def test_value_head_that_does_not_fit_names_the_checkpoint(checkpoints, tmp_path):
    directory = shutil.copytree(checkpoints["legacy"], tmp_path / "legacy")
    from safetensors.torch import save_file
    save_file({"v_head.summary.weight": torch.zeros(1, 7), "v_head.summary.bias": torch.zeros(1)},
              str(directory / "v_head.safetensors"))
    with pytest.raises(ValueError, match=f"v_head weights saved with {directory} do not fit this model"):
        AutoModelForCausalLMWithValueHead.from_pretrained(directory)


def test_a_weights_file_instead_of_its_directory_is_refused(checkpoints):
    with pytest.raises(ValueError, match="must be a checkpoint directory or a hub id, got the file"):
        AutoModelForCausalLMWithValueHead.from_pretrained(checkpoints["safetensors"] / "model.safetensors")
