"""bench/tools/profile_step.py and the step's compute floor (bench/suites/flops.py): the FLOP count by
hand, the phase aggregation on profiles of known shape (a CPU one from real record_function ranges, a
CUDA one built by hand, since CI has no GPU), one smoke run of the tool, and the report's MFU column."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).parents[2]


def test_step_flops_by_hand(bench):
    from transformers import LlamaConfig

    flops = bench("flops")
    config = LlamaConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=16, vocab_size=32)
    # per layer q, o 8·8 and k, v 8·4 (one kv head of 4), MLP 3·8·16; LM head 32·8; value head 8
    assert flops.matmul_weights(config) == 2 * (64 + 64 + 32 + 32 + 384) + 256 + 8 == 1416
    # 3 rows of 5 tokens: 2·1416·15 + causal attention 4·2 layers·8·(3·5²)/2; × (2 rollout + 3·2 epochs)
    assert flops.forward_flops(config, [5, 5, 5]) == 42480 + 2400
    assert flops.step_flops(config, 3, 5, ppo_epochs=2) == 44880 * 8 == 359040
    assert flops.step_flops(config, 2, [3, 4], ppo_epochs=1) == pytest.approx(
        5 * (2 * 1416 * 7 + 4 * 2 * 8 * (9 + 16) / 2))
    with pytest.raises(ValueError):
        flops.step_flops(config, 3, [5, 5], ppo_epochs=1)


def test_matmul_weights_are_the_benchmark_models_linear_weights(bench):
    """The count from the config is what bench_step's value-head Llama holds in its nn.Linear weights."""
    bench_step, flops = bench("bench_step"), bench("flops")
    settings = dict(bench_step.SETTINGS["smoke"], kv_heads=1)
    model = bench_step.llama_policy(settings, 16, torch.device("cpu"))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops.matmul_weights(bench_step.llama_config(settings, 16)) == linear


def test_phase_times_from_record_function_ranges(bench):
    """Two 'steps' of nested ranges on CPU: counts and host times per step, and the step's time outside them."""
    profile_step = bench("profile_step")
    record = torch.profiler.record_function
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(2):
            with record(profile_step.STEP):
                time.sleep(0.004)  # outside every phase
                with record("fastppo/rollout_forward"):
                    time.sleep(0.003)
                for _ in range(3):
                    with record("fastppo/minibatch_forward"):
                        time.sleep(0.001)
                    with record("fastppo/optimizer_step"):
                        torch.ones(4).sum()
    times = profile_step.phase_times(profile.events(), steps=2)
    assert times[profile_step.STEP]["count"] == 1 and times["fastppo/rollout_forward"]["count"] == 1
    assert times["fastppo/minibatch_forward"]["count"] == 3 and times["fastppo/optimizer_step"]["count"] == 3
    assert times["fastppo/stats"] == dict(count=0, host_ms=0, device_ms=None)  # CPU: no device time
    assert times["fastppo/rollout_forward"]["host_ms"] >= 3 and times["fastppo/minibatch_forward"]["host_ms"] >= 3
    inside = sum(times[name]["host_ms"] for name in profile_step.PHASES)  # the phases do not overlap here
    assert times["outside"] == pytest.approx(times[profile_step.STEP]["host_ms"] - inside, abs=1e-3)
    assert times["outside"] >= 4


def test_phase_times_on_cuda_counts_device_ops_by_launch(bench):
    """A CUDA profile by hand: ranges on the main thread, kernels launched inside them (the backward's from
    another thread, as the autograd engine does), GPU-side annotations, and an annotation that is no kernel."""
    profile_step = bench("profile_step")
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, start, end, device_type, annotation=False, id=0):
        span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, time_range=span, device_type=device_type, is_user_annotation=annotation,
                               id=id)

    step, rollout, backward = profile_step.STEP, "fastppo/rollout_forward", "fastppo/minibatch_backward"
    ranges = [event(step, 0, 1000, cpu), event(rollout, 100, 300, cpu), event(backward, 400, 900, cpu),
              event("fastppo/stats", 950, 990, cpu)]
    annotations = [event(step, 50, 2000, cuda, True), event(rollout, 150, 700, cuda, True),
                   event(backward, 800, 1900, cuda, True), event("Optimizer.step#AdamW.step", 1500, 1900, cuda, True)]
    # (launch time, kernel start, duration): two in the rollout, two in the backward, one in the step only
    kernels = [(110, 200, 400), (290, 600, 50), (500, 900, 500), (850, 1500, 300), (995, 1950, 10)]
    launches = [event("cudaLaunchKernel" if i % 2 else "cuLaunchKernel", t, t + 5, cpu, id=100 + i)
                for i, (t, _, _) in enumerate(kernels)]
    device_ops = [event(f"kernel{i}", s, s + d, cuda, id=100 + i) for i, (_, s, d) in enumerate(kernels)]
    times = profile_step.phase_times(ranges + annotations + launches + device_ops, steps=1)
    assert times["device_method"] == "launch"
    assert times[rollout] == dict(count=1, host_ms=0.2, device_ms=pytest.approx(0.45))
    assert times[backward]["device_ms"] == pytest.approx(0.8) and times["fastppo/stats"]["device_ms"] == 0
    assert times[step]["device_ms"] == pytest.approx(1.26)
    assert times["outside"] == pytest.approx(1 - 0.2 - 0.5 - 0.04)

    # no launch to match (an older profiler): the ops that started inside each GPU-side annotation
    times = profile_step.phase_times(ranges + annotations + device_ops, steps=1)
    assert times["device_method"] == "annotation"
    assert times[rollout]["device_ms"] == pytest.approx(0.45)  # 200..600 and 600..650 start in 150..700
    assert times[backward]["device_ms"] == pytest.approx(0.8)  # the AdamW annotation's 400 µs is not a kernel
    assert times[step]["device_ms"] == pytest.approx(1.26) and times["fastppo/stats"]["device_ms"] == 0


def test_smoke_run_prints_the_phases(bench, tmp_path, capsys):
    profile_step = bench("profile_step")
    out = tmp_path / "profile.json"
    results = profile_step.main(["--mode", "smoke", "--steps", "1", "--backend", "torch", "--json", str(out)])
    (result,) = results
    assert json.loads(out.read_text())[0]["shape_id"] == result["shape_id"] == "B2xQ4xR8"
    assert result["wall_ms"] > 0 and result["flops"] > 0 and result["matmul_flops"] > 0 and result["mfu"] > 0
    printed = capsys.readouterr().out
    assert "| phase | count/step | host ms/step | device ms/step | % of step (host) |" in printed
    phases = result["phases"]
    assert all(name in phases for name in profile_step.PHASES)
    trainer_has_ranges = any("fastppo/rollout_forward" in path.read_text()
                             for path in (ROOT / "fastppo").rglob("*.py"))
    if not trainer_has_ranges:  # before the trainer opens its ranges the tool says so
        assert "opens no torch.profiler.record_function ranges" in printed
        pytest.skip("the trainer has no fastppo/* record_function ranges yet")
    settings = bench("bench_step").SETTINGS["smoke"]
    minibatches = settings["batch_size"] // settings["mini_batch_size"]  # × 1 PPO epoch
    for name in (profile_step.STEP, "fastppo/rollout_forward", "fastppo/rewards", "fastppo/advantages",
                 "fastppo/stats"):
        assert phases[name]["count"] == 1 and phases[name]["host_ms"] > 0, name
    for name in ("fastppo/minibatch_forward", "fastppo/minibatch_backward", "fastppo/optimizer_step"):
        assert phases[name]["count"] == minibatches, name
    assert 0 <= phases["outside"] < phases[profile_step.STEP]["host_ms"]
    assert "| fastppo/rollout_forward | 1 |" in printed and "= host" in printed


def test_report_shows_mfu_for_step_rows(bench, tmp_path):
    report = bench("report")

    def row(provider, ms, mfu):
        info = dict(op="step", provider=provider, dims="BT", shape=[4, 544], shape_id="B4xQ32xR512", dtype="bf16",
                    seq_len=512, tokens_per_step=2176, ppo_epochs=1, model=dict(hidden=896, layers=24, heads=14,
                    vocab=151936), parameters=494_032_768, peak_bytes=2**30, median_ms=ms,
                    tokens_per_s=2176 / (ms / 1e3), flops=1e14, mfu=mfu)
        return {"group": "step", "name": f"bench_step[{provider}]", "extra_info": info, "stats": {"median": ms}}

    data = {"benchmarks": [row("torch", 400.0, 0.25), row("triton", 200.0, 0.5)], "machine_info": {}}
    (tmp_path / "results.json").write_text(json.dumps(data))
    text = Path(report.write_report([str(tmp_path / "results.json")], str(tmp_path))).read_text()
    assert "| batch × query × response | variant | median ms | tokens/s | × torch | MFU % | peak MiB |" in text
    assert "| B4xQ32xR512 | torch | 400 | 5,440 | 1 | 25 | 1,024 |" in text
    assert "| B4xQ32xR512 | triton | 200 | 10,880 | 2 | 50 | 1,024 |" in text
    assert "MFU = the step's model FLOPs" in text
