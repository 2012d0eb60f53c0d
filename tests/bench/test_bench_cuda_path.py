"""bench/suites/ harness.py and machine.py down their CUDA branches, on CPU tensors behind a fake CUDA layer.

CI has no GPU, so `do_bench` timing, the CUDA peak-memory reading, the measured ceilings and
the device header would otherwise run for the first time on a lent GPU. The fake `do_bench`
binds its arguments to the installed triton's real signature, so a call the real one would
refuse fails here too; the fake allocator counters and device properties give known numbers.
"""

import inspect
from types import SimpleNamespace

import pytest
import torch

triton_testing = pytest.importorskip("triton.testing")

MEDIAN_MS, Q1_MS, Q3_MS = 2.0, 1.5, 2.5


@pytest.fixture()
def bench_modules(bench):
    return bench("harness"), bench("machine")


@pytest.fixture()
def fake_cuda(monkeypatch, bench_modules):
    """CPU tensors, CUDA answers: device properties, allocator counters, synchronize, do_bench."""
    harness, _ = bench_modules
    calls = SimpleNamespace(do_bench=[], peak_resets=0)
    real_do_bench = triton_testing.do_bench

    def do_bench(fn, *args, **kwargs):
        bound = inspect.signature(real_do_bench).bind(fn, *args, **kwargs)  # raises as the real one would
        calls.do_bench.append(dict(bound.arguments))
        fn()
        if kwargs.get("quantiles") is not None:
            return [{0.5: MEDIAN_MS, 0.25: Q1_MS, 0.75: Q3_MS}[q] for q in kwargs["quantiles"]]
        return MEDIAN_MS

    def reset_peak(device=None):
        calls.peak_resets += 1

    properties = SimpleNamespace(name="Fake H100", total_memory=80 * 2**30, L2_cache_size=50 << 20)
    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    monkeypatch.setattr(harness.BenchEnv, "cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5096)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return calls


class Benchmark:
    """What run_case uses of pytest-benchmark's fixture."""

    def __init__(self):
        self.group, self.extra_info, self.rounds = None, {}, 0

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        for _ in range(rounds + warmup_rounds):
            fn()
        self.rounds = rounds


def test_run_case_times_with_do_bench_and_reads_the_cuda_peak(bench_modules, fake_cuda):
    harness, _ = bench_modules
    env = harness.BenchEnv(mode="gpu", device=torch.device("cpu"))
    env._ceilings = {"copy_GBps": 1000.0, "matmul_TFLOPs": 500.0, "matmul_dtype": "bf16", "method": "preset"}
    calls = []
    benchmark = Benchmark()
    harness.run_case(benchmark, env, group="gae", provider="eager", dims="BT", shape=(4, 1 << 20),
                     dtype=torch.float32, make_inputs=lambda: (torch.ones(4, 1 << 20),),
                     call=lambda args: calls.append(args[0].shape) or args[0].sum(),
                     bytes_moved=16e6, flops=4e9)
    info = benchmark.extra_info
    # 16 MiB inputs against a 50 MiB L2: ⌈2·50 / 16⌉ = 7 rotated copies
    assert info["input_copies"] == 7
    assert (info["median_ms"], info["q1_ms"], info["q3_ms"], info["timer"]) == (MEDIAN_MS, Q1_MS, Q3_MS,
                                                                               "cuda_do_bench")
    bench_call = fake_cuda.do_bench[-1]
    assert bench_call["warmup"] == 25 and 100 <= bench_call["rep"] <= 3000
    # the CUDA peak: max allocated during one call minus what was allocated before it
    assert (info["peak_bytes"], info["peak_kind"]) == (4096, "cuda_max_allocated") and fake_cuda.peak_resets == 1
    assert info["gbps"] == pytest.approx(16e6 / 2e-3 / 1e9)
    assert info["pct_floor"] == pytest.approx(100 * (16e6 / 1000e9) / 2e-3)
    assert info["pct_matmul"] == pytest.approx(100 * (4e9 / 500e12) / 2e-3)
    assert benchmark.rounds == 20  # 0.2 s of host-timed rounds at 2 ms, at most 20
    assert len(calls) == 2 + 1 + 21  # warm-up, peak, do_bench's call, 1 + 20 pedantic rounds


def test_ceilings_and_header_on_cuda(bench_modules, fake_cuda, monkeypatch):
    harness, machine = bench_modules
    monkeypatch.setattr(machine, "_nvidia_driver", lambda: "580.159.04")
    env = harness.BenchEnv(mode="smoke", device=torch.device("cpu"))
    ceilings = env.ceilings
    # smoke sizes: a 64 MiB copy (read + write) and a 1024³ matmul, both "2 ms"
    assert ceilings["copy_GBps"] == pytest.approx(2 * (64 << 20) / 2e-3 / 1e9)
    assert ceilings["matmul_TFLOPs"] == pytest.approx(2 * 1024**3 / 2e-3 / 1e12)
    assert ceilings["matmul_dtype"] == "bf16" and ceilings["method"].startswith("triton do_bench median")
    assert [call.get("return_mode") for call in fake_cuda.do_bench] == ["median", "median"]
    info = machine.environment_info(env)
    assert info["device_name"] == "Fake H100" and info["device_memory_GiB"] == 80.0
    assert info["driver"] == "580.159.04" and info["ceilings"] is ceilings
    assert env.cache_bytes() == 50 << 20
