"""Every Triton kernel compiles for an H100 (sm_90) at the GPU's launch configurations, without spills.

bench/tools/compile_sm90.py compiles ahead of time (triton's own ptxas and cuobjdump, no GPU needed):
so a kernel that only the interpreter has run cannot reach a GPU session failing to compile,
or spilling registers to local memory, unnoticed.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).parents[2]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def launched_kernels() -> set:
    """Names of the @triton.jit functions in kernels/ that are launched (`name[grid](...)`)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        jitted = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                  and any("jit" in ast.unparse(d) for d in node.decorator_list)}
        launched = {node.value.id for node in ast.walk(tree)
                    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)}
        names |= jitted & launched
    return names


@pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="this triton ships no NVIDIA toolchain")
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "compile.json"
    script = ROOT / "bench" / "tools" / "compile_sm90.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert all(row["ok"] and row["local"] == 0 and row["registers"] > 0 for row in rows)
    expected = launched_kernels()
    assert len(expected) >= 9 and {row["kernel"] for row in rows} == expected
    # the configurations a GPU picks: 2048-column vocab blocks over 4 warps, 2048-wide token tiles, dual clip,
    # rollout importance weights (alone and with the dual clip)
    configs = [row["config"] for row in rows]
    assert any(c.get("BLOCK") == 2048 and c["num_warps"] == 4 for c in configs)
    assert any(c.get("BLOCK_T") == 2048 for c in configs) and any(c.get("DUAL_CLIP") for c in configs)
    assert any(c.get("ROLLOUT_IS") and not c.get("DUAL_CLIP") for c in configs)
    assert any(c.get("ROLLOUT_IS") and c.get("DUAL_CLIP") for c in configs)
    assert any(c.get("SEQ_RATIO") and c.get("WEIGHTED") for c in configs)  # the objectives beyond TRL's
    assert any(c.get("WEIGHTED") and not c.get("SEQ_RATIO") for c in configs)
    # rows stream as 128-bit vector loads in every vocab kernel, also when V is odd (rows off 16-byte
    # boundaries, a ragged end: only the first and last block of a row are masked)
    vocab_rows = [row for row in rows if row["case"].startswith("V=") and "BLOCK" in row["config"]]
    assert {row["kernel"] for row in vocab_rows} == {"_logprobs_forward_kernel", "_logprobs_backward_kernel",
                                                     "_full_kl_kernel"}
    assert any("5001" in row["case"] for row in vocab_rows)
    assert all(16 in row["load_widths"] for row in vocab_rows), vocab_rows
