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
