"""bench/tools/sweep.py, the GPU tuning sweep, still runs: every op × launch configuration, checked.

On CPU it runs `--smoke` (tiny shapes, the GPU launch heuristics through the interpreter), so a
GPU session can spend its minutes on the sweep's numbers rather than on fixing the script.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).parents[2]


def test_sweep_checks_every_configuration(tmp_path, bench):
    out = tmp_path / "sweep.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "tools" / "sweep.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    sweep = bench("sweep")
    expected = {"logprobs_fwd": sweep.VOCAB_CONFIGS, "logprobs_fwd_bwd": sweep.VOCAB_CONFIGS,
                "full_kl": sweep.VOCAB_CONFIGS, "kl_reward": sweep.TOKEN_CONFIGS, "gae": sweep.TOKEN_CONFIGS,
                "masked_whiten": sweep.TOKEN_CONFIGS, "ppo_loss_fwd_bwd": sweep.TOKEN_CONFIGS,
                "linear_logprobs": sweep.LINEAR_CONFIGS}
    for op, configs in expected.items():
        rows = [row for row in data["rows"] if row["op"] == op]
        assert len(rows) == len(configs) and all(row["ok"] and row["ms"] > 0 for row in rows), (op, rows)
    assert len({row["config"] for row in data["rows"] if row["op"] == "logprobs_fwd"}) == len(sweep.VOCAB_CONFIGS)
    assert "| logprobs_fwd | block 2048, 4 warps | yes |" in result.stdout  # today's default is among them
    if not torch.cuda.is_available():
        assert data["device"] == "cpu"
