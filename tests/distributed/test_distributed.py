"""Two processes through accelerate (DDP on CPU, gloo): ranks agree on weights and on reduced stats."""

import json
import os
import shutil
import subprocess
import sys

import pytest


def _two_processes(script: str, port: int, *args) -> None:
    """Run tests/distributed/`script` under `accelerate launch` on 2 CPU processes (gloo); it must succeed."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", FASTPPO_BACKEND="torch")
    env.pop("TRITON_INTERPRET", None)
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               os.path.join(os.path.dirname(__file__), script), *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_two_process_step_keeps_ranks_in_sync(gpt2_dir, tokenizer_dir, tmp_path):
    _two_processes("distributed_step.py", 29517, gpt2_dir, tokenizer_dir, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # DDP averages gradients, so both ranks hold the same weights after every optimizer step
    assert ranks[0]["weights_sum"] == pytest.approx(ranks[1]["weights_sum"], rel=1e-6)
    assert ranks[0]["weights_abs_sum"] == pytest.approx(ranks[1]["weights_abs_sum"], rel=1e-6)
    # rank 1's NaN mini-batch was skipped by both ranks (the decision is all-reduced): weights stay finite, in sync
    assert [r["stats"][1]["fastppo/skipped_nonfinite"] for r in ranks] == [1.0, 1.0]
    assert [r["stats"][0]["fastppo/skipped_nonfinite"] for r in ranks] == [0.0, 0.0]
    assert all(r["finite"] for r in ranks)
    # KL controller and score moments see the global batch, so they agree too
    assert ranks[0]["kl_coef"] == pytest.approx(ranks[1]["kl_coef"], rel=1e-9)
    assert ranks[0]["running_mean"] == pytest.approx(ranks[1]["running_mean"], rel=1e-6)
    for key in ("objective/kl", "ppo/loss/total", "ppo/mean_scores", "ppo/policy/clipfrac"):
        assert ranks[0]["stats"][1][key] == pytest.approx(ranks[1]["stats"][1][key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_two_process_encoder_decoder_step_keeps_ranks_in_sync(tmp_path):
    _two_processes("seq2seq_step.py", 29519, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["optimizer_steps"] == 4 for r in ranks)
    # the ranks' rows had different widths (widened to the widest, encoder and decoder); DDP averaged the gradients
    assert ranks[0]["weights_sum"] == pytest.approx(ranks[1]["weights_sum"], rel=1e-6)
    assert ranks[0]["weights_abs_sum"] == pytest.approx(ranks[1]["weights_abs_sum"], rel=1e-6)
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"], rel=1e-5)
