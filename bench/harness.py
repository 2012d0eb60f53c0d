"""What every benchmark shares: run modes, providers, timing, peak memory, hardware ceilings.

Modes (picked once per run, see `run_mode`):

- ``gpu``: a CUDA device. DESIGN.md §6's shapes; providers eager / compile / fastppo / liger.
  Time = `triton.testing.do_bench` median (warm-up, L2 flushed before every call) over
  inputs rotated through enough copies to overflow L2; pytest-benchmark also records a few
  host-timed rounds (synchronised) so its JSON is complete.
- ``cpu``: no CUDA. Moderate shapes; providers eager / reference / compile, timed with
  pytest-benchmark (median of rounds, perf_counter) over rotated inputs. The fastppo provider
  would run under the Triton interpreter (Python, orders of magnitude slower): not timed.
- ``smoke`` (``--bench-smoke`` or FASTPPO_BENCH_SMOKE=1): tiny shapes, one timed round, on
  whatever device there is; every provider that can run — fastppo included, under the
  interpreter on CPU — so CI proves the suite still runs. Its numbers mean nothing.

Every benchmark stores what the report needs in `benchmark.extra_info`: op, provider, shape,
dtype, seq_len, device, bytes (that must move), flops, median_ms, GB/s and % of the
bandwidth floor (bytes / measured copy bandwidth), peak memory and how it was measured.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pytest
import torch

SMOKE_ENV = "FASTPPO_BENCH_SMOKE"
SMOKE_COMPILE_ENV = "FASTPPO_BENCH_SMOKE_COMPILE"
THREADS_ENV = "FASTPPO_BENCH_THREADS"
GAE_COMPILE_MAX_T_ENV = "FASTPPO_BENCH_GAE_COMPILE_MAX_T"

PROVIDERS = ("eager", "reference", "compile", "fastppo", "liger")
PROVIDER_DOC = {
    "eager": "the plain PyTorch a TRL user runs today: fastppo.reference (logits.float(), log_softmax, "
             "gather; the Python reverse loop for GAE; the unfused loss)",
    "reference": "fastppo.ops with backend='torch': the same eager code behind fastppo's argument checks "
                 "(CPU runs only)",
    "compile": "torch.compile(eager function, dynamic=False), compiled once per shape before timing",
    "fastppo": "fastppo.ops with backend='triton' (the Triton kernels)",
    "liger": "liger-kernel's nearest equivalent (cross-entropy, reduction='none', negated), when installed",
}
MASK_DTYPE = torch.bool  # response masks in the token benchmarks

MAX_INPUT_COPIES = 8
GPU_PEDANTIC_S = 0.2  # host-timed rounds on CUDA: the do_bench median is the number reported
CPU_TARGET_S = 0.6  # time spent in timed rounds per CPU case
CPU_MIN_ROUNDS, CPU_MAX_ROUNDS = 3, 50


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


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
            self._ceilings = measure_ceilings(self.device, self.smoke)
        return self._ceilings

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def cache_bytes(self) -> int:
        """Last-level cache the rotated inputs must overflow (L2 on CUDA, L3 or so on CPU)."""
        if self.cuda:
            return int(getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 << 20))
        sizes = []
        root = "/sys/devices/system/cpu/cpu0/cache"
        for index in os.listdir(root) if os.path.isdir(root) else []:
            try:
                text = open(os.path.join(root, index, "size")).read().strip()
            except OSError:
                continue
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        return max(sizes, default=32 << 20)


def _median_s(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device, smoke: bool) -> dict:
    """Measured (never datasheet) copy bandwidth and matmul rate of `device`.

    Copy: device-to-device `dst.copy_(src)`, bandwidth = (read + write bytes) / time. Matmul:
    a square bf16 matmul on CUDA (fp32 on CPU, where bf16 GEMMs are not the fast path), 2·n³ / time.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        n_bytes = (64 << 20) if smoke else (1 << 30)
        src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        copy_s = do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3
        n, mm_dtype = (1024 if smoke else 8192), torch.bfloat16
        a = torch.randn(n, n, dtype=mm_dtype, device=device)
        b = torch.randn(n, n, dtype=mm_dtype, device=device)
        matmul_s = do_bench(lambda: a @ b, return_mode="median") / 1e3
        method = f"triton do_bench median: {n_bytes >> 20} MiB copy_, {n}³ {dtype_name(mm_dtype)} matmul"
    else:
        n_bytes = (16 << 20) if smoke else (256 << 20)
        src = torch.ones(n_bytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_s = _median_s(lambda: dst.copy_(src), lambda: None, 3 if smoke else 7)
        n, mm_dtype = (256 if smoke else 1024), torch.float32
        a, b = torch.randn(n, n), torch.randn(n, n)
        matmul_s = _median_s(lambda: a @ b, lambda: None, 3 if smoke else 7)
        method = f"perf_counter median: {n_bytes >> 20} MiB copy_, {n}³ {dtype_name(mm_dtype)} matmul"
    return {
        "copy_GBps": 2 * n_bytes / copy_s / 1e9,
        "matmul_TFLOPs": 2 * n**3 / matmul_s / 1e12,
        "matmul_dtype": dtype_name(mm_dtype),
        "method": method,
    }


def environment_info(env: BenchEnv) -> dict:
    """Device name, driver and library versions, threads, ceilings: the report's header."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton missing or broken
        triton_version = "not installed"
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:
        liger = "not installed"
    info = {
        "mode": env.mode,
        "device_type": env.device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "liger_kernel": liger,
        "python": platform.python_version(),
        "ceilings": env.ceilings,
    }
    if env.cuda:
        props = torch.cuda.get_device_properties(env.device)
        info["device_name"] = props.name
        info["device_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver() or "unknown"
    else:
        info["device_name"] = _cpu_name()
        info["driver"] = "n/a (CPU)"
        info["cpu_count"] = os.cpu_count()
        info["torch_threads"] = torch.get_num_threads()
    return info


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


# --------------------------------------------------------------------------- providers


def provider_skip_reason(provider: str, env: BenchEnv) -> Optional[str]:
    """Why `provider` does not run in this mode (None: it runs)."""
    if provider == "reference" and env.mode == "gpu":
        return "reference = eager behind fastppo's argument checks: timed on CPU only"
    if provider == "compile" and env.smoke and os.environ.get(SMOKE_COMPILE_ENV, "") in ("", "0"):
        return (f"torch.compile warm-up (~20 s cold on CPU, then seconds per graph) exceeds the smoke budget; "
                f"set {SMOKE_COMPILE_ENV}=1 to include it")
    if provider == "fastppo":
        try:
            import triton  # noqa: F401
        except Exception as exc:
            return f"triton does not import ({exc})"
        if not env.cuda:
            if env.mode == "cpu":
                return ("CPU: the Triton kernels run only under the interpreter (Python, not a benchmark); "
                        "--bench-smoke runs them at tiny shapes")
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "TRITON_INTERPRET=1 was not set before triton was imported"
    if provider == "liger":
        if not env.cuda:
            return "liger-kernel needs CUDA"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
    return None


def compiled(fn: Callable) -> Callable:
    """torch.compile of `fn`, static shapes, with Dynamo's caches reset so every case compiles afresh."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# --------------------------------------------------------------------------- memory


def _cpu_status_kib(field_name: str) -> Optional[int]:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak(fn: Callable[[], object], env: BenchEnv) -> tuple:
    """(peak bytes allocated by one call of `fn` beyond what was live before it — the inputs —, how).

    CUDA: `torch.cuda.max_memory_allocated()` minus the allocation before the call (exact for
    everything that goes through PyTorch's allocator: eager, compile, Triton launches).
    CPU: growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs) after a
    malloc_trim: approximate (allocator reuse, page granularity); None where Linux lacks it.
    """
    gc.collect()
    if env.cuda:
        env.synchronize()
        before = torch.cuda.memory_allocated(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        result = fn()
        env.synchronize()
        peak = torch.cuda.max_memory_allocated(env.device) - before
        del result
        return peak, "cuda_max_allocated"
    _malloc_trim()
    before = _cpu_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
    except OSError:
        before = None
    result = fn()
    high = _cpu_status_kib("VmHWM")
    del result
    if before is None or high is None:
        return None, "unavailable"
    return max(0, high - before) * 1024, "cpu_rss_peak"


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def free_device_memory(env: BenchEnv) -> None:
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()


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
    second measures peak memory; then the timed calls. Out of memory skips the case as "OOM".
    """
    benchmark.group = group
    info = benchmark.extra_info
    info.update(
        op=group, provider=provider, dims=dims, shape=list(shape), shape_id=shape_id(dims, shape),
        dtype=dtype_name(dtype), seq_len=int(shape[dims.index("T")]), device=str(env.device), mode=env.mode,
        bytes=float(bytes_moved), flops=float(flops),
    )
    oom = None
    try:
        first = make_inputs()
        copies = max(1, min(MAX_INPUT_COPIES, math.ceil(2 * env.cache_bytes() / max(tensor_bytes(first), 1))))
        inputs = [first] + [make_inputs() for _ in range(copies - 1)]
        info["input_copies"] = copies
        cycle = itertools.cycle(inputs)

        def step():
            return call(next(cycle))

        start = time.perf_counter()
        call(inputs[0])
        env.synchronize()
        info["warmup_s"] = time.perf_counter() - start
        peak, kind = measure_peak(lambda: call(inputs[0]), env)
        info["peak_bytes"], info["peak_kind"] = peak, kind
        if env.cuda:
            _time_cuda(benchmark, env, step, info)
        else:
            _time_host(benchmark, env, step, info)
    except torch.cuda.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0][:160]
    if oom is not None:
        inputs = first = cycle = None
        free_device_memory(env)
        pytest.skip(f"OOM ({oom})")
    ceilings = env.ceilings
    seconds = info["median_ms"] / 1e3
    info["gbps"] = bytes_moved / seconds / 1e9
    info["pct_floor"] = 100.0 * (bytes_moved / (ceilings["copy_GBps"] * 1e9)) / seconds
    if flops:
        info["tflops"] = flops / seconds / 1e12
        info["pct_matmul"] = 100.0 * (flops / (ceilings["matmul_TFLOPs"] * 1e12)) / seconds
    inputs = first = cycle = None  # `step` closes over `cycle`: drop the copies before the next case
    free_device_memory(env)


def _time_cuda(benchmark, env: BenchEnv, step: Callable, info: dict) -> None:
    from triton.testing import do_bench

    warmup_ms, rep_ms = (1, 5) if env.smoke else (25, 100)
    median, low, high = do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    info.update(median_ms=median, q20_ms=low, q80_ms=high, timer="cuda: triton.testing.do_bench median, L2 flushed")

    def synced():
        step()
        env.synchronize()

    rounds = 1 if env.smoke else max(3, min(20, round(GPU_PEDANTIC_S / max(median / 1e3, 1e-6))))
    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=0 if env.smoke else 1)


def _time_host(benchmark, env: BenchEnv, step: Callable, info: dict) -> None:
    if env.smoke:
        rounds = 1
    else:
        once = _median_s(step, lambda: None, 1)
        rounds = max(CPU_MIN_ROUNDS, min(CPU_MAX_ROUNDS, round(CPU_TARGET_S / max(once, 1e-6))))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = benchmark.stats.stats
    info.update(median_ms=stats.median * 1e3, q20_ms=None, q80_ms=None,
                timer=f"host: pytest-benchmark median of {rounds} rounds (perf_counter)")


def random_mask(batch: int, length: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A right-padded response mask `[B, T]`: each row's response starts early and ends at a random point."""
    start = torch.randint(0, max(1, length // 8), (batch, 1), generator=generator)
    stop = torch.randint(max(1, length // 2), length + 1, (batch, 1), generator=generator)
    positions = torch.arange(length).unsqueeze(0)
    return ((positions >= start) & (positions < stop)).to(device=device, dtype=MASK_DTYPE)
