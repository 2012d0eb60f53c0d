"""gae (generalised advantage estimation, TRL-classic masking): provider × shape × dtype.

Bytes that must move per token, fp32 and a bool mask: read rewards, values (4 + 4) and the
mask (1), write advantages and returns (4 + 4): 17 bytes. Eager is the Python reverse loop
over T (≈ 5 kernel launches a step); the kernel is one launch of a blocked scan.
DESIGN.md §6 bar at B=64, T=8192: ≥ 100× the eager loop and ≤ 50 µs.

torch.compile unrolls the T-step loop: compile time grows with T (on the 2-core CPU machine
~12 s at T=16, ~18 s at T=64, ~95 s at T=256), so the compile provider runs only up to
T = FASTPPO_BENCH_GAE_COMPILE_MAX_T (default 128) and is skipped, saying so, above it.
"""

import os

import pytest
import torch

import harness
from fastppo import ops, reference

DIMS = "BT"
PROVIDERS = ("eager", "reference", "compile", "fastppo")
SHAPES = {
    "gpu": [(64, 128), (64, 1024), (64, 2048), (64, 4096), (64, 8192)],  # §6: T=8192; T=128 for compile
    "cpu": [(8, 16), (8, 64), (8, 256), (8, 1024)],
    "smoke": [(2, 16)],
}
DTYPES = {"gpu": [torch.float32], "cpu": [torch.float32], "smoke": [torch.float32]}
GAMMA, LAM = 1.0, 0.95


def _implementation(provider):
    return harness.implementation(
        provider,
        eager=lambda rewards, values, mask: reference.gae(rewards, values, mask, GAMMA, LAM),
        reference=lambda rewards, values, mask: ops.gae(rewards, values, mask, GAMMA, LAM, backend="torch"),
        fastppo=lambda rewards, values, mask: ops.gae(rewards, values, mask, GAMMA, LAM, backend="triton"),
    )


def _inputs(shape, dtype, device):
    generator = torch.Generator().manual_seed(0)
    rewards = (0.1 * torch.randn(shape, device=device)).to(dtype)
    values = torch.randn(shape, device=device).to(dtype)
    return rewards, values, harness.random_mask(*shape, device, generator)


def bench_gae(benchmark, bench_env, provider, shape, dtype):
    max_compile_t = int(os.environ.get(harness.GAE_COMPILE_MAX_T_ENV, "128"))
    if provider == "compile" and shape[1] > max_compile_t:
        pytest.skip(f"torch.compile unrolls the {shape[1]}-step Python loop (compile time grows with T); "
                    f"compiled only up to T={max_compile_t} ({harness.GAE_COMPILE_MAX_T_ENV})")
    fn = _implementation(provider)
    tokens = shape[0] * shape[1]
    with torch.no_grad():
        harness.run_case(
            benchmark, bench_env, group="gae", provider=provider, dims=DIMS, shape=shape, dtype=dtype,
            make_inputs=lambda: _inputs(shape, dtype, bench_env.device),
            call=lambda args: fn(*args),
            bytes_moved=tokens * (4 * dtype.itemsize + harness.MASK_DTYPE.itemsize),
        )
