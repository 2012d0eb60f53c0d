"""The benchmark suites (bench/suites/) still run: their one command in smoke mode writes the JSON, table and plot.

`bash bench/run.sh --bench-smoke` runs every benchmark at tiny shapes with one round (the
fastppo provider under the Triton interpreter on CPU) and then bench/report.py. Also checks
the parts a CPU run never reaches: the out-of-memory search and an OOM inside a case.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
BENCH = ROOT / "bench"
OPS = ("logprobs_fwd", "logprobs_fwd_bwd", "full_kl", "kl_reward", "gae", "ppo_loss_fwd_bwd", "ppo_loss_gspo_fwd_bwd",
       "linear_logprobs")
TITLES = ("logprobs_from_logits — forward", "logprobs_from_logits — forward + backward", "full_kl — forward",
          "kl_penalty_rewards", "## gae", "ppo_loss — forward + backward", "linear_logprobs — forward + backward",
          "PPOTrainer.step, end to end")


@pytest.fixture()
def bench_modules(bench):
    return bench("harness"), bench("bench_step")


def test_bench_suite_runs_in_smoke_mode_and_writes_the_report(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, FASTPPO_BENCH_OUT=str(tmp_path))
    result = subprocess.run(["bash", str(BENCH / "run.sh"), "--bench-smoke", "-q"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    data = json.loads((tmp_path / "results.json").read_text())
    machine = data["machine_info"]["fastppo"]
    assert machine["mode"] == "smoke" and machine["ceilings"]["copy_GBps"] > 0
    ran = {(b["extra_info"]["op"], b["extra_info"]["provider"]) for b in data["benchmarks"]}
    for op in OPS:
        assert (op, "eager") in ran, op
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            assert (op, "fastppo") in ran, op
    assert {("step", "torch"), ("step_longest", "torch")} <= ran
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        assert {("step", "triton"), ("step", "triton-fused"), ("step", "triton-grpo"),
                ("step_longest", "triton-fused")} <= ran
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if info["op"] in OPS:
            assert info["median_ms"] > 0 and info["bytes"] > 0 and info["pct_floor"] > 0, bench["name"]
            assert "peak_bytes" in info and info["shape"] and info["dtype"], bench["name"]

    report = (tmp_path / "RESULTS.md").read_text()
    assert report.startswith("# fastppo benchmark results")
    if not torch.cuda.is_available():
        assert "CPU run" in report and "GPU figures are pending" in report
    for title in TITLES:
        assert title in report, title
    table_header = "| shape | dtype | provider | median ms | IQR % | × eager | × compile | GB/s | % floor | "
    assert report.count(table_header) == len(OPS)
    assert "| B2xT8xV1000 | bf16 | eager |" in report
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is skipped, saying so, without it
        assert (tmp_path / "results.png").stat().st_size > 10_000


def test_longest_fitting_doubles_then_bisects(bench_modules):
    _, bench_step = bench_modules
    tried = []

    def fits(length):
        tried.append(length)
        return length <= 5000

    longest, first_oom = bench_step.longest_fitting(fits, start=1024, limit=1 << 17, granularity=256)
    assert longest <= 5000 < first_oom and first_oom - longest <= max(256, longest // 8)
    assert tried[:4] == [1024, 2048, 4096, 8192]
    assert bench_step.longest_fitting(lambda n: True, start=8, limit=16, granularity=4) == (16, None)
    assert bench_step.longest_fitting(lambda n: False, start=8, limit=16, granularity=4)[0] == 0


def test_out_of_memory_in_a_case_is_reported_as_oom(bench_modules):
    harness, _ = bench_modules

    class Benchmark:  # what run_case uses of pytest-benchmark's fixture
        group, extra_info = None, {}

    def call(_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    env = harness.BenchEnv(mode="cpu", device=torch.device("cpu"))
    with pytest.raises(pytest.skip.Exception, match="OOM"):
        harness.run_case(Benchmark(), env, group="logprobs_fwd", provider="eager", dims="BTV", shape=(1, 2, 3),
                         dtype=torch.float32, make_inputs=lambda: (torch.zeros(1, 2, 3),), call=call, bytes_moved=24)
