"""Sharded training through accelerate with two CPU processes (gloo): DeepSpeed ZeRO-2, ZeRO-3 and
FSDP2 against DDP on the same global batch (tests/sharded_scenarios.py does the work in each process).

Per backend and model: greedy `generate` (ZeRO-3 and FSDP2 gather the weights for it), two SGD steps,
`save_state` after step 1 and `load_state` in fresh processes, the consolidated `save_pretrained`
loaded by plain transformers. The examples/accelerate configs are the ones launched, with the
process count and precision overridden for a CPU.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

from typing import Optional

import pytest
import torch

HERE = os.path.dirname(__file__)
CONFIGS = os.path.join(HERE, "..", "..", "examples", "accelerate")
SCRIPT = os.path.join(HERE, "sharded_scenarios.py")
pytestmark = pytest.mark.slow


def _launch(backend: str, scenario: str, model_dir: str, tokenizer_dir: str, out_dir: str, port: int,
            switches: Optional[dict] = None) -> None:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTPPO_BACKEND="torch",
               FASTPPO_SCENARIO_SWITCHES=json.dumps(switches or {}))
    env.pop("TRITON_INTERPRET", None)
    if backend == "ddp":  # accelerate starts a CPU world only with --multi_gpu and cpu=True (NOTES.md)
        env["ACCELERATE_USE_CPU"] = "true"
        launch = ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    else:
        launch = ["--config_file", os.path.join(CONFIGS, f"{backend}.yaml")]
    command = [accelerate, "launch", *launch, "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", str(port), SCRIPT, scenario, model_dir, tokenizer_dir, out_dir]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _reports(out_dir, scenario):
    return [json.loads(open(os.path.join(out_dir, f"rank{r}-{scenario}.json")).read()) for r in (0, 1)]


def _weights(directory):
    from safetensors.torch import load_file

    (path,) = glob.glob(os.path.join(directory, "*.safetensors"))
    return load_file(path)


def _assert_same_stats(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def ddp_runs(model_dirs, tokenizer_dir, tmp_path_factory):
    """The DDP reference per model, run once: reports and the saved checkpoint."""
    runs = {}

    def get(model: str):
        if model not in runs:
            out = str(tmp_path_factory.mktemp(f"ddp-{model}"))
            _launch("ddp", "run", model_dirs[model], tokenizer_dir, out, port=29561)
            runs[model] = out
        return runs[model]

    return get


@pytest.mark.parametrize("backend,model", [("zero2", "gpt2"), ("zero3", "gpt2"), ("zero3", "llama"), ("fsdp2", "gpt2"),
                                           ("fsdp2", "llama")])
def test_sharded_run_trains_generates_saves_and_resumes_as_ddp(backend, model, model_dirs, tokenizer_dir, ddp_runs,
                                                                tmp_path):
    if backend.startswith("zero"):
        pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    baseline = ddp_runs(model)
    out = str(tmp_path)
    _launch(backend, "run", model_dirs[model], tokenizer_dir, out, port=29562)
    expected, got = _reports(baseline, "run"), _reports(out, "run")
    for rank in (0, 1):
        assert got[rank]["world_size"] == 2
        if backend.startswith("zero"):
            assert got[rank]["engine"] == "DeepSpeedEngine" and got[rank]["zero_stage"] == int(backend[-1])
        if backend == "zero3":  # weights are sharded: no process holds a whole tensor between passes
            assert got[rank]["local_numel"] == 0
        if backend == "fsdp2":  # fully_shard: every process holds about half of every weight
            assert got[rank]["engine"].startswith("FSDP")
            assert got[rank]["local_numel"] < 0.6 * expected[rank]["local_numel"]
        assert got[rank]["generated"] == expected[rank]["generated"]  # greedy, from the gathered weights
        for step in ("1", "2"):  # SGD: reduction order aside, the same global batch gives the same update
            _assert_same_stats(got[rank]["stats"][step], expected[rank]["stats"][step])

    # one consolidated checkpoint, in the same layout and with the same weights as DDP's
    saved, reference = _weights(os.path.join(out, "model")), _weights(os.path.join(baseline, "model"))
    assert saved.keys() == reference.keys() and any(k.startswith("v_head.") for k in saved)
    for key, value in reference.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6, msg=key)
    plain, info = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    for key, value in plain.state_dict().items():
        if key in saved:
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)

    # save_state after step 1 → load_state in new processes → step 2 as in the uninterrupted run
    _launch(backend, "resume", model_dirs[model], tokenizer_dir, out, port=29563)
    resumed = _reports(out, "resume")
    for rank in (0, 1):
        _assert_same_stats(resumed[rank]["stats"]["2"], got[rank]["stats"]["2"])
    resumed_weights = _weights(os.path.join(out, "resumed"))
    for key, value in saved.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=0, msg=key)


def _fake_deepspeed_accelerator(ds_config: dict):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin),
                           num_processes=1)


def test_deepspeed_config_takes_ppoconfig_values_and_refuses_conflicting_ones():
    from fastppo import PPOConfig, sharding

    config = PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.5)
    ds_config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}
    accelerator = _fake_deepspeed_accelerator(ds_config)
    sharding.configure_deepspeed(accelerator, config)
    assert ds_config["train_micro_batch_size_per_gpu"] == 2 and ds_config["gradient_accumulation_steps"] == 2
    assert ds_config["gradient_clipping"] == 0.5 and "train_batch_size" not in ds_config
    assert sharding.shards_parameters(accelerator) and sharding.zero_stage(accelerator) == 3

    conflicting = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto"}
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        sharding.configure_deepspeed(_fake_deepspeed_accelerator(conflicting), config)
    unclipped = {}
    sharding.configure_deepspeed(_fake_deepspeed_accelerator(unclipped), PPOConfig(max_grad_norm=None))
    assert unclipped["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"


def test_fsdp1_is_refused_by_name():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from fastppo import sharding

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP,
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        sharding.check_supported(fsdp)
    fsdp.state.fsdp_plugin.fsdp_version = 2
    sharding.check_supported(fsdp)
    assert sharding.shards_parameters(fsdp) and not sharding.is_deepspeed(fsdp)


def test_fsdp2_with_packed_token_budget_micro_batches_trains_as_padded_ddp(model_dirs, tokenizer_dir, ddp_runs,
                                                                           tmp_path):
    """padding_free + a 14-token budget under FSDP2: at step 1 rank 0 needs two rollout passes (6 + 10 tokens),
    rank 1 one (8 + 5); the counts are evened out
    so that every sharded forward has its partner on the other process."""
    baseline = ddp_runs("llama")
    out = str(tmp_path)
    _launch("fsdp2", "run", model_dirs["llama"], tokenizer_dir, out, port=29564,
            switches={"padding_free": True, "max_tokens_per_microbatch": 14})
    expected, got = _reports(baseline, "run"), _reports(out, "run")
    for rank in (0, 1):
        for step in ("1", "2"):
            for key, value in expected[rank]["stats"][step].items():  # packed attention: float noise, not bits
                assert got[rank]["stats"][step][key] == pytest.approx(value, rel=2e-4, abs=2e-5), key
    saved, reference = _weights(os.path.join(out, "model")), _weights(os.path.join(baseline, "model"))
    for key, value in reference.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)
