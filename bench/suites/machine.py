"""What the machine can do and what a call costs in memory: measured ceilings, device and
library versions for the report's header, peak memory of one call.

Ceilings are measured once per run, never taken from a datasheet: device-to-device copy
bandwidth (the floor of a memory-bound op is bytes / this) and a large matmul's rate.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import subprocess
import time
from typing import Callable, Optional

import torch


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def median_s(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device, smoke: bool, cuda: Optional[bool] = None) -> dict:
    """Measured (never datasheet) copy bandwidth and matmul rate of `device`.

    Copy: device-to-device `dst.copy_(src)`, bandwidth = (read + write bytes) / time. Matmul:
    a square bf16 matmul on CUDA (fp32 on CPU, where bf16 GEMMs are not the fast path), 2·n³ / time.
    `cuda` (default: the device's type) picks the branch; the tests fake a CUDA device with it.
    """
    if (device.type == "cuda") if cuda is None else cuda:
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
        copy_s = median_s(lambda: dst.copy_(src), lambda: None, 3 if smoke else 7)
        n, mm_dtype = (256 if smoke else 1024), torch.float32
        a, b = torch.randn(n, n), torch.randn(n, n)
        matmul_s = median_s(lambda: a @ b, lambda: None, 3 if smoke else 7)
        method = f"perf_counter median: {n_bytes >> 20} MiB copy_, {n}³ {dtype_name(mm_dtype)} matmul"
    return {
        "copy_GBps": 2 * n_bytes / copy_s / 1e9,
        "matmul_TFLOPs": 2 * n**3 / matmul_s / 1e12,
        "matmul_dtype": dtype_name(mm_dtype),
        "method": method,
    }


def environment_info(env) -> dict:
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


def last_level_cache_bytes(device: torch.device, cuda: Optional[bool] = None) -> int:
    """Last-level cache size: L2 on CUDA, the largest CPU cache Linux reports (32 MiB if none)."""
    if (device.type == "cuda") if cuda is None else cuda:
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
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


def measure_peak(fn: Callable[[], object], env) -> tuple:
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


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure, whichever layer reported it (caching allocator, cuBLAS, a raw CUDA call)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def free_device_memory(env) -> None:
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()
