"""Distributed runs that would train apart, desynchronise or hang fail loudly instead, on every rank (2 CPU
processes; tests/distributed/refusal_scenarios.py does the work in each)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "refusal_scenarios.py")
CONFIGS = os.path.join(HERE, "..", "..", "examples", "accelerate")
pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTPPO_BACKEND="torch", **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(command, env, timeout=300):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _accelerate(*launch, port, args, env):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    _run([accelerate, "launch", *launch, "--num_processes", "2", "--mixed_precision", "no", "--main_process_port",
          str(port), SCRIPT, *args], env)


def _ddp(port, args):
    _accelerate("--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no", port=port, args=args,
                env=_env(ACCELERATE_USE_CPU="true"))


def _reports(out, scenario):
    return [json.loads(open(os.path.join(out, f"rank{r}-{scenario}.json")).read()) for r in (0, 1)]


def test_bad_input_on_one_rank_is_refused_on_every_rank(gpt2_dir, tokenizer_dir, tmp_path):
    _ddp(29571, ["refusals", gpt2_dir, tokenizer_dir, tmp_path])
    ranks = _reports(tmp_path, "refusals")
    expected = {  # case → (error type, processes named, words of the refused process's own message)
        "nan_score_on_1": ("ValueError", "[1]", "process 1: scores[0] is nan"),
        "bad_type_on_0": ("TypeError", "[0]", "process 0: scores must be a list of scalar tensors"),
        "bad_on_both": ("ValueError", "[0, 1]", "outside the model's vocabulary"),
        "generate_bad_query_on_1": ("ValueError", "[1]", "process 1: query_tensor[0] holds token ids"),
        "generate_bad_option_on_0": ("ValueError", "[0]", "process 0: batch_size must be a positive integer"),
        "check_failed_on_1": ("RuntimeError", "[1]", "process 1: device lost"),
    }
    for case, (kind, processes, words) in expected.items():
        raised = [rank[case] for rank in ranks]
        assert raised[0] == raised[1], case  # the same error, word for word, on both ranks
        assert raised[0]["raised"] == kind and f"process(es) {processes} of 2" in raised[0]["message"], raised
        assert words in raised[0]["message"], raised[0]["message"]
    assert "process 1: scores[0] is nan" in ranks[0]["bad_on_both"]["message"]
    for rank in ranks:  # nothing changed on either rank; the good step then trained both alike
        assert rank["after"] == rank["before"]
        assert rank["after_good_step"]["weights"] != rank["before"]["weights"]
    assert ranks[0]["after_good_step"]["weights"] == pytest.approx(ranks[1]["after_good_step"]["weights"], rel=1e-9)
    assert ranks[0]["kl"] == pytest.approx(ranks[1]["kl"], rel=1e-6)


def test_torchrun_without_a_distributed_setup_is_refused(gpt2_dir, tokenizer_dir, tmp_path):
    """torchrun starts a gloo world of 2 that accelerate (no config, no cpu=True) leaves as distributed_type NO."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    _run([torchrun, "--standalone", "--nproc_per_node", "2", SCRIPT, "construct", gpt2_dir, tokenizer_dir, tmp_path],
         _env())
    for rank in _reports(tmp_path, "construct"):
        assert rank["construct"]["raised"] == "ValueError"
        message = rank["construct"]["message"]
        assert "torch.distributed runs 2 processes, but accelerate set up no distributed training" in message
        assert "accelerator_kwargs={'cpu': True}" in message


def test_zero3_where_accelerate_counts_one_process_is_refused(gpt2_dir, tokenizer_dir, tmp_path):
    """DeepSpeed on a machine without GPUs: accelerate counts 1 process (every rank index 0) in a world of 2."""
    pytest.importorskip("deepspeed")
    _accelerate("--config_file", os.path.join(CONFIGS, "zero3.yaml"), port=29573,
                args=["construct", gpt2_dir, tokenizer_dir, tmp_path], env=_env())
    for rank in _reports(tmp_path, "construct"):
        assert rank["construct"]["raised"] == "ValueError", rank
        assert "accelerate counts 1 process(es)" in rank["construct"]["message"]
        assert "torch.distributed runs 2" in rank["construct"]["message"]


def test_an_fsdp_launch_that_accelerate_does_not_shard_is_refused(gpt2_dir, tokenizer_dir, tmp_path):
    """accelerate selects FSDP only where it sees GPUs: on a CPU machine the FSDP launch would train as DDP."""
    _accelerate("--config_file", os.path.join(CONFIGS, "fsdp2.yaml"), port=29575,
                args=["construct", gpt2_dir, tokenizer_dir, tmp_path], env=_env())
    for rank in _reports(tmp_path, "construct"):
        assert rank["construct"]["raised"] == "ValueError", rank
        assert "the launch asked for FSDP (ACCELERATE_USE_FSDP=true)" in rank["construct"]["message"]


def test_a_stuck_rank_ends_the_others_step_within_the_timeout(gpt2_dir, tokenizer_dir, tmp_path):
    """accelerate's InitProcessGroupKwargs(timeout=...) bounds every collective: rank 0 does not wait forever."""
    _ddp(29577, ["timeout", gpt2_dir, tokenizer_dir, tmp_path])
    first, second = _reports(tmp_path, "timeout")
    assert first["raised"] is not None and first["seconds"] < 20, first  # the timeout is 8 s, rank 1 stalls 24 s
    assert second["raised"] is not None  # and the stalled rank, when it comes back, does not train on alone
    assert first["unchanged"] and second["unchanged"]
