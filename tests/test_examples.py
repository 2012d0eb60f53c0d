"""The examples run (at toy sizes): a broken example is a broken promise in the README."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


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
