"""The examples run (at toy sizes): a broken example is a broken promise in the README."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import checkpoint_with_tokenizer

ROOT = Path(__file__).parents[2]


def test_long_sequence_example_runs_every_mode():
    env = dict(os.environ, FASTPPO_BACKEND="torch")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "long_sequence.py"), "--lengths", "24", "--modes", "full",
         "response", "fused", "--vocab", "300", "--hidden", "32", "--layers", "1", "--steps", "1", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " 24 " in line]
    assert [line.split()[0] for line in lines] == ["full", "response", "fused"]
    assert all("tok/s" in line for line in lines)


def _quickstart(gpt2_dir, tokenizer_dir, tmp_path, *flags) -> tuple:
    """`(stdout, output dir)` of examples/quickstart.py at toy size on the tiny GPT-2 (it must succeed)."""
    model_dir = checkpoint_with_tokenizer(gpt2_dir, tokenizer_dir, tmp_path / "tiny")
    out = tmp_path / "out"
    env = dict(os.environ, FASTPPO_BACKEND="torch")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--model", str(model_dir), "--steps", "2",
         "--batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "4", "--device", "cpu",
         "--output-dir", str(out), *flags],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, out


def test_quickstart_runs_on_a_tiny_local_model(gpt2_dir, tokenizer_dir, tmp_path):
    stdout, out = _quickstart(gpt2_dir, tokenizer_dir, tmp_path)
    assert (out / "reward_curve.png").is_file()
    assert (out / "model" / "config.json").is_file()
    assert "AutoModelForCausalLM" in stdout


def test_quickstart_runs_grpo_on_the_plain_lm(gpt2_dir, tokenizer_dir, tmp_path):
    stdout, out = _quickstart(gpt2_dir, tokenizer_dir, tmp_path, "--advantage-estimator", "grpo", "--group-size", "2",
                              "--kl-loss-coef", "0.1", "--loss-aggregation", "seq-mean-token-mean",
                              "--importance-sampling-level", "sequence")
    assert "advantages grpo (group size 2), loss seq-mean-token-mean with sequence ratios" in stdout
    assert "peak resident memory" in stdout
    assert (out / "model" / "config.json").is_file()


def test_quickstart_reward_counts_sentiment_words():
    sys.path.insert(0, str(ROOT / "examples"))
    from quickstart import sentiment_reward

    assert sentiment_reward("A great, wonderful day!") == 2.0
    assert sentiment_reward("Terrible and sad.") == -2.0
    assert sentiment_reward("love " * 10) == 4.0  # clipped
    assert sentiment_reward("A table.") == 0.0
