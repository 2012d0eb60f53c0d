"""What every benchmark shares: run modes, providers, one timed case (`run_case`).

Modes (picked once per run, see `run_mode`):

- ``gpu``: a CUDA device. DESIGN.md §6's shapes; providers eager / compile / fastppo / liger.
  Time = `triton.testing.do_bench` median (warm-up, L2 flushed before every call) over
  inputs rotated through enough copies to overflow L2; pytest-benchmark also records a few
  host-timed rounds (synchronised) so its JSON is complete.
- ``cpu``: no CUDA. Moderate shapes; providers eager / reference / compile, timed with
  pytest-benchmark (median of rounds, perf_counter) over rotated inputs. The fastppo provider
  would run under the Triton interpreter (Python, orders of magnitude slower): not timed.
- ``smoke`` (``--bench-smoke`` or FASTPPO_BENCH_SMOKE=1): tiny shapes, one timed round, on
  whatever device there is; every provider that can run — fastppo (and liger, where
  installed) included, under the interpreter on CPU — so CI proves the suite still runs.
  Its numbers mean nothing.

Every benchmark stores what the report needs in `benchmark.extra_info`: op, provider, shape,
dtype, seq_len, device, bytes (that must move), flops, median_ms, GB/s and % of the
bandwidth floor (bytes / measured copy bandwidth), peak memory and how it was measured
(machine.py measures the ceilings and the memory).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pytest
import torch

import machine

SMOKE_ENV = "FASTPPO_BENCH_SMOKE"
SMOKE_COMPILE_ENV = "FASTPPO_BENCH_SMOKE_COMPILE"
THREADS_ENV = "FASTPPO_BENCH_THREADS"
GAE_COMPILE_MAX_T_ENV = "FASTPPO_BENCH_GAE_COMPILE_MAX_T"

PROVIDER_DOC = {
    "eager": "the plain PyTorch a TRL user runs today: fastppo.reference (logits.float(), log_softmax, "
             "gather; the Python reverse loop for GAE; the unfused loss)",
    "reference": "fastppo.ops with backend='torch': the same eager code behind fastppo's argument checks "
                 "(CPU and smoke runs)",
    "compile": "torch.compile(eager function, dynamic=False), compiled once per shape before timing",
    "fastppo": "fastppo.ops with backend='triton' (the Triton kernels)",
    "fastppo-inplace": "logprobs forward + backward only: the same kernels with inplace_backward=True, the "
                       "gradient written over the logits (what PPOTrainer uses for the LM head's output)",
    "liger": "liger-kernel's nearest equivalent (cross-entropy, reduction='none', negated), when installed",
}
MASK_DTYPE = torch.bool  # response masks in the token benchmarks

MAX_INPUT_COPIES = 64  # small launch-bound inputs: as many copies as it takes to overflow the cache
GPU_PEDANTIC_S = 0.2  # host-timed rounds on CUDA: the do_bench median is the number reported
CPU_TARGET_S = 1.0  # time spent in timed rounds per CPU case
CPU_MIN_ROUNDS, CPU_MAX_ROUNDS = 5, 50


dtype_name = machine.dtype_name


def shape_id(dims: str, shape: Sequence[int]) -> str:
    return "x".join(f"{d}{n}" for d, n in zip(dims, shape))


def run_mode(config) -> str:
    """"smoke", "gpu" or "cpu" for this pytest run."""
    if config.getoption("--bench-smoke", default=False) or os.environ.get(SMOKE_ENV, "") not in ("", "0"):
        return "smoke"
    return "gpu" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- the run's environment


@dataclass
class BenchEnv:
    """Device, mode and (lazily measured) hardware ceilings of one benchmark run."""

    mode: str
    device: torch.device
    _ceilings: Optional[dict] = field(default=None, repr=False)

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def ceilings(self) -> dict:
        if self._ceilings is None:
            self._ceilings = machine.measure_ceilings(self.device, self.smoke, self.cuda)
        return self._ceilings

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def cache_bytes(self) -> int:
        """Last-level cache the rotated inputs must overflow (L2 on CUDA, L3 or so on CPU)."""
        return machine.last_level_cache_bytes(self.device, self.cuda)


# --------------------------------------------------------------------------- providers


def provider_skip_reason(provider: str, env: BenchEnv) -> Optional[str]:
    """Why `provider` does not run in this mode (None: it runs)."""
    if provider == "reference" and env.mode == "gpu":
        return "reference = eager behind fastppo's argument checks: timed on CPU only"
    if provider == "compile" and env.smoke and os.environ.get(SMOKE_COMPILE_ENV, "") in ("", "0"):
        return (f"torch.compile warm-up (~20 s cold on CPU, then seconds per graph) exceeds the smoke budget; "
                f"set {SMOKE_COMPILE_ENV}=1 to include it")
    if provider in ("fastppo", "fastppo-inplace"):
        try:
            import triton  # noqa: F401
        except Exception as exc:
            return f"triton does not import ({exc})"
        if env.cuda and os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 on a CUDA machine would time the interpreter; unset it"
        if not env.cuda:
            if env.mode == "cpu":
                return ("CPU: the Triton kernels run only under the interpreter (Python, not a benchmark); "
                        "--bench-smoke runs them at tiny shapes")
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "TRITON_INTERPRET=1 was not set before triton was imported"
    if provider == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
        if not env.cuda and not (env.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
            return "CPU: liger-kernel's Triton kernels run only under the interpreter (--bench-smoke runs them)"
    return None


def compiled(fn: Callable) -> Callable:
    """torch.compile of `fn`, static shapes, with Dynamo's caches reset so every case compiles afresh."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# --------------------------------------------------------------------------- one benchmark case


def run_case(
    benchmark,
    env: BenchEnv,
    *,
    group: str,
    provider: str,
    dims: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    make_inputs: Callable[[], tuple],
    call: Callable[[tuple], object],
    bytes_moved: float,
    flops: float = 0.0,
) -> None:
    """Time `call(inputs)` for one (provider, shape, dtype) and fill `benchmark.extra_info`.

    `make_inputs()` builds one fresh set of inputs; enough sets to overflow the last-level
    cache (at most MAX_INPUT_COPIES) are built and cycled through, so no call finds its
    inputs in cache from the previous one. The first call warms up (compiles, JITs); the
    second measures peak memory; then the timed calls. Out of memory skips the case as "OOM"
    (the report shows it in the table); so does an exception from liger-kernel, saying what it was.
    """
    benchmark.group = group
    info = benchmark.extra_info
    info.update(
        op=group, provider=provider, dims=dims, shape=list(shape), shape_id=shape_id(dims, shape),
        dtype=dtype_name(dtype), seq_len=int(shape[dims.index("T")]), device=str(env.device), mode=env.mode,
        bytes=float(bytes_moved), flops=float(flops),
    )
    skip_reason = None
    try:
        first = make_inputs()
        copies = math.ceil(2 * env.cache_bytes() / max(machine.tensor_bytes(first), 1))
        copies = max(1, min(2 if env.smoke else MAX_INPUT_COPIES, copies))
        inputs = [first] + [make_inputs() for _ in range(copies - 1)]
        info["input_copies"] = copies
        cycle = itertools.cycle(inputs)

        def step():
            return call(next(cycle))

        def timed_call():
            start = time.perf_counter()
            result = call(inputs[0])
            env.synchronize()
            elapsed.append(time.perf_counter() - start)
            return result

        elapsed = []
        timed_call()  # warm-up: compilation, JIT, allocator growth
        peak, kind = machine.measure_peak(timed_call, env)
        info.update(warmup_s=elapsed[0], peak_bytes=peak, peak_kind=kind)
        if env.cuda:
            _time_cuda(benchmark, env, step, info, call_s=elapsed[1])
        else:
            _time_host(benchmark, env, step, info, call_s=elapsed[1])
    except Exception as exc:  # noqa: BLE001 - sorted below: OOM, a third-party failure, or a real error
        first_line = (str(exc).splitlines() or [""])[0][:160]
        if machine.is_out_of_memory(exc):
            skip_reason = f"OOM ({first_line})"
        elif provider == "liger":  # another project's kernel: report what it raised, keep the run going
            skip_reason = f"liger-kernel raised {type(exc).__name__}: {first_line}"
        else:
            raise
    if skip_reason is not None:  # outside the except block, so the traceback's tensors are already freed
        inputs = first = cycle = None
        machine.free_device_memory(env)
        pytest.skip(skip_reason)
    ceilings = env.ceilings
    seconds = info["median_ms"] / 1e3
    info["gbps"] = bytes_moved / seconds / 1e9
    info["pct_floor"] = 100.0 * (bytes_moved / (ceilings["copy_GBps"] * 1e9)) / seconds
    if flops:
        info["tflops"] = flops / seconds / 1e12
        info["pct_matmul"] = 100.0 * (flops / (ceilings["matmul_TFLOPs"] * 1e12)) / seconds
    inputs = first = cycle = None  # `step` closes over `cycle`: drop the copies before the next case
    machine.free_device_memory(env)


def _time_cuda(benchmark, env: BenchEnv, step: Callable, info: dict, call_s: float) -> None:
    from triton.testing import do_bench

    # do_bench repeats for `rep` ms: at least ~10 calls of a slow op (an eager GAE loop), at most 3 s.
    warmup_ms, rep_ms = (1, 5) if env.smoke else (25, min(3000.0, max(100.0, 10 * call_s * 1e3)))
    median, q1, q3 = do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
    info.update(median_ms=median, q1_ms=q1, q3_ms=q3, timer="cuda_do_bench")

    def synced():
        step()
        env.synchronize()

    rounds = 1 if env.smoke else max(3, min(20, round(GPU_PEDANTIC_S / max(median / 1e3, 1e-6))))
    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=0 if env.smoke else 1)


def _time_host(benchmark, env: BenchEnv, step: Callable, info: dict, call_s: float) -> None:
    if env.smoke:
        rounds = 1
    else:
        rounds = max(CPU_MIN_ROUNDS, min(CPU_MAX_ROUNDS, round(CPU_TARGET_S / max(call_s, 1e-6))))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = benchmark_stats(benchmark)
    if stats is None:  # --benchmark-disable: one untimed call; report the measured warm call instead
        info.update(median_ms=call_s * 1e3, q1_ms=None, q3_ms=None, timer="single_call", rounds=1)
        return
    quartiles = (stats.q1 * 1e3, stats.q3 * 1e3) if rounds >= 4 else (None, None)  # too few rounds for an IQR
    info.update(median_ms=stats.median * 1e3, q1_ms=quartiles[0], q3_ms=quartiles[1], timer="host_rounds",
                rounds=rounds)


def benchmark_stats(benchmark):
    """pytest-benchmark's statistics of the rounds just run (None under --benchmark-disable)."""
    metadata = getattr(benchmark, "stats", None)
    return getattr(metadata, "stats", None)


def random_mask(batch: int, length: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A right-padded response mask `[B, T]`: each row's response starts early and ends at a random point."""
    start = torch.randint(0, max(1, length // 8), (batch, 1), generator=generator)
    stop = torch.randint(max(1, length // 2), length + 1, (batch, 1), generator=generator)
    positions = torch.arange(length).unsqueeze(0)
    return ((positions >= start) & (positions < stop)).to(device=device, dtype=MASK_DTYPE)


def implementation(provider: str, *, eager: Callable, reference: Callable, fastppo: Callable,
                   liger: Optional[Callable[[], Callable]] = None,
                   fastppo_inplace: Optional[Callable] = None) -> Callable:
    """The callable `provider` times; `liger` is a factory (it imports liger-kernel)."""
    if provider == "eager":
        return eager
    if provider == "reference":
        return reference
    if provider == "compile":
        return compiled(eager)
    if provider == "fastppo":
        return fastppo
    if provider == "fastppo-inplace" and fastppo_inplace is not None:
        return fastppo_inplace
    if provider == "liger" and liger is not None:
        try:
            return liger()
        except Exception as exc:  # noqa: BLE001 - an API this version of liger-kernel lacks
            pytest.skip(f"liger-kernel: {type(exc).__name__}: {exc}")
    raise ValueError(f"no {provider!r} implementation for this op")
