"""rollout_engine="vllm" end to end: weight sync after each step, greedy parity with HF, TIS, PEFT.

Each test runs `tests/vllm_scenarios.py` in a child process (an in-process vLLM engine rebinds
torch's threads and seeds the global RNG) on a tiny Llama whose head_dim is 32, the smallest
vLLM's CPU attention takes. They need vLLM: `bash scripts/test_vllm.sh` builds its environment
and runs them; elsewhere they skip (or fail, with FASTPPO_REQUIRE_VLLM=1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_with_tokenizer

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("FASTPPO_REQUIRE_VLLM") == "1":
    raise RuntimeError("FASTPPO_REQUIRE_VLLM=1 but vllm does not import in this environment")
pytestmark = [
    pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here; bash scripts/test_vllm.sh runs these"),
    pytest.mark.slow,
]

SCRIPT = Path(__file__).parent / "vllm_scenarios.py"
SYNCED = 1e-4  # float32 engine vs float32 policy, same weights
CHANGED = 1e-3  # one lr=1e-2 step moves some log-prob by far more than this


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    path = tmp_path_factory.mktemp("llama64")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def run_scenario(name, model_dir, tokenizer_dir, out_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), name, model_dir, tokenizer_dir, str(out_dir)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    line = next(line for line in reversed(result.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def check_rounds(rounds, first_syncs=1):
    """first_syncs: pushes before round 1's generate (1 = the initial one; 0 = it happened earlier)."""
    for index, record in enumerate(rounds):
        assert record["syncs"] == (first_syncs if index == 0 else 1)  # one push per step, none besides
        assert record["lengths_match"]
        assert record["gap"] <= SYNCED  # the engine's log-probs are the policy's own
        stats = record["stats"]
        assert stats["rollout/logprob_diff_max"] <= SYNCED  # step's rollout forward agrees too
        assert 0 <= stats["rollout/logprob_diff_mean"] <= stats["rollout/logprob_diff_max"]
        assert 0 <= stats["rollout/kl"] <= SYNCED


def test_vllm_engine_trains_syncs_and_matches_hf(llama_dir, tokenizer_dir, tmp_path):
    result = run_scenario("train", llama_dir, tokenizer_dir, tmp_path / "saved")
    check_rounds(result["rounds"], first_syncs=0)  # the greedy comparison before training synced first
    for record in result["rounds"]:  # TIS on: weights ≈ 1 when the engine is in sync
        assert abs(record["stats"]["fastppo/policy/tis_weight_mean"] - 1) <= 1e-3
        assert record["stats"]["fastppo/policy/tis_clipfrac"] == 0
    assert result["syncs_without_step"] == 0
    assert result["unsynced_gap"] > CHANGED  # the control: without the sync the log-probs are stale
    assert result["resynced_gap"] <= SYNCED
    for pair in (result["greedy_initial"], result["greedy_trained"]):
        assert pair["vllm"] == pair["hf"]
    assert result["n2_prefixes_ok"]
    assert result["single_shape"][0] == 3 and 1 <= result["single_shape"][1] <= 8
    assert result["fixed_lengths"] == [6, 6, 6, 6]
    assert result["eos_cut"] == result["eos_expected"]
    assert result["seeded_equal"]
    assert result["length_sampler"] == [3, 3, 3, 3]
    assert result["num_beams_refused"]
    assert result["ref_pairs"]
    assert result["saved_max_diff"] == 0


def test_vllm_engine_syncs_merged_lora_weights(llama_dir, tokenizer_dir, tmp_path):
    pytest.importorskip("peft")
    result = run_scenario("peft", llama_dir, tokenizer_dir, tmp_path / "saved")
    check_rounds(result["rounds"])
    assert result["ref_pairs"]  # the reference (the adapter-free base) still generates


def test_vllm_engine_syncs_gathered_weights_under_zero3(llama_dir, tokenizer_dir, tmp_path):
    """One process under DeepSpeed ZeRO-3: the policy holds partitions only, the engine gets whole weights."""
    pytest.importorskip("deepspeed")
    result = run_scenario("zero3", llama_dir, tokenizer_dir, tmp_path / "saved")
    assert result["zero_stage"] == 3 and result["local_numel"] == 0
    check_rounds(result["rounds"])


def test_quickstart_runs_on_the_vllm_engine(llama_dir, tokenizer_dir, tmp_path):
    model_dir = checkpoint_with_tokenizer(llama_dir, tokenizer_dir, tmp_path / "tiny")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parents[2] / "examples" / "quickstart.py"), "--model", str(model_dir),
         "--steps", "3", "--batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "6", "--device", "cpu",
         "--backend", "torch", "--rollout-engine", "vllm", "--rollout-correction", "tis", "--output-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "generation (vllm): median" in result.stdout
    gap = float(result.stdout.split("engine vs policy log-probs: max |diff| ")[1].split()[0])
    assert gap <= SYNCED
    assert (out / "model" / "config.json").is_file() and "AutoModelForCausalLM" in result.stdout


DISTRIBUTED_SCRIPT = Path(__file__).parent / "vllm_distributed_scenarios.py"
ACCELERATE_CONFIGS = Path(__file__).parents[2] / "examples" / "accelerate"


def run_on_two_processes(backend, scenario, model_dir, tokenizer_dir, out_dir, port) -> list:
    """Each rank's JSON of vllm_distributed_scenarios.py under `accelerate launch` (2 CPU processes, gloo)."""
    import shutil

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", FASTPPO_BACKEND="torch")
    if backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
        launch = ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    else:
        launch = ["--config_file", str(ACCELERATE_CONFIGS / f"{backend}.yaml")]
    command = [accelerate, "launch", *launch, "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", str(port), str(DISTRIBUTED_SCRIPT), scenario, model_dir, tokenizer_dir,
               str(out_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((Path(out_dir) / f"rank{r}-{scenario}.json").read_text()) for r in (0, 1)]


def check_distributed(ranks, distributed_type):
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["distributed_type"] == distributed_type
        assert rank["rng_kept"]  # building, syncing and sampling the engine moved none of the trainer's streams
        for index, record in enumerate(rank["rounds"]):
            assert record["syncs"] == (0 if index == 0 else 1)  # the first draw synced; then one per step
            assert record["lengths_match"]
            # each rank's engine is its policy, by the test's own forward and by step's rollout statistics
            assert record["gap"] <= SYNCED and record["stats"]["rollout/logprob_diff_max"] <= SYNCED
        assert rank["unsynced_gap"] > CHANGED  # the control: without the sync the engine lags behind
        assert rank["greedy_vllm"] == rank["greedy_hf"]
    for first, second in zip(ranks[0]["rounds"], ranks[1]["rounds"]):
        assert first["weights_sum"] == pytest.approx(second["weights_sum"], rel=1e-9)  # the replicas agree


@pytest.mark.parametrize("backend,distributed_type", [("ddp", "MULTI_CPU"), ("zero2", "DEEPSPEED"),
                                                      ("zero3", "DEEPSPEED"), ("fsdp2", "FSDP")])
def test_vllm_on_every_process(llama_dir, tokenizer_dir, tmp_path, backend, distributed_type):
    """One engine per process, synced after every step from the full weights (ZeRO-3 and FSDP2: made whole one
    tensor at a time); each process samples its own queries, with a seed of its own."""
    if backend.startswith("zero"):
        pytest.importorskip("deepspeed")
    ranks = run_on_two_processes(backend, "sync", llama_dir, tokenizer_dir, tmp_path, 29591)
    check_distributed(ranks, distributed_type)
    if backend in ("zero3", "fsdp2"):  # the policy is sharded: each process holds about half of it
        assert all(rank["local_numel"] < 0.75 * rank["numel"] for rank in ranks)
    assert ranks[0]["shared_draw"] != ranks[1]["shared_draw"]  # seeds differ per rank
    assert ranks[0]["first_draw"] != ranks[1]["first_draw"]


def test_vllm_tensor_parallel_over_two_processes(llama_dir, tokenizer_dir, tmp_path):
    """tensor_parallel_size=2: one engine over both processes samples both ranks' queries, each rank gets its own."""
    ranks = run_on_two_processes("ddp", "tp2", llama_dir, tokenizer_dir, tmp_path, 29593)
    check_distributed(ranks, "MULTI_CPU")
    # both ranks' copies of the same queries are separate requests of the group's one batch: separate draws
    assert ranks[0]["shared_draw"] != ranks[1]["shared_draw"]
