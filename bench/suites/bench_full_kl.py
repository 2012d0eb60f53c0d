"""full_kl (exact KL over the vocabulary), forward only: provider × shape × dtype.

Bytes that must move, N = B·T rows of V logits, s bytes each: both rows read once, 2·N·V·s
(+ 4 bytes a row written). DESIGN.md §6 bar at N=8192, V=128256, bf16: ≥ 80 % of that floor.
liger-kernel has no equivalent (its KL-divergence takes log-probabilities, not logits).
"""

import torch

import harness
from fastppo import ops, reference

DIMS = "BTV"
PROVIDERS = ("eager", "reference", "compile", "fastppo")
SHAPES = {
    "gpu": [(4, 1024, 128256), (4, 2048, 128256), (4, 4096, 128256)],  # N = 4096 … 16384 (§6: 8192)
    "cpu": [(2, 32, 32000), (2, 128, 32000), (2, 256, 32000)],
    "smoke": [(2, 8, 1000)],
}
DTYPES = {
    "gpu": [torch.bfloat16, torch.float32],
    "cpu": [torch.float32, torch.bfloat16],
    "smoke": [torch.bfloat16],
}


def _implementation(provider):
    return harness.implementation(
        provider,
        eager=reference.full_kl,
        reference=lambda logits, ref_logits: ops.full_kl(logits, ref_logits, backend="torch"),
        fastppo=lambda logits, ref_logits: ops.full_kl(logits, ref_logits, backend="triton"),
    )


def _inputs(shape, dtype, device):
    logits = torch.randn(shape, dtype=dtype, device=device)
    ref_logits = logits + 0.5 * torch.randn(shape, dtype=dtype, device=device)  # a nearby policy
    return logits, ref_logits


def bench_full_kl(benchmark, bench_env, provider, shape, dtype):
    fn = _implementation(provider)
    rows, vocab = shape[0] * shape[1], shape[2]
    with torch.no_grad():
        harness.run_case(
            benchmark, bench_env, group="full_kl", provider=provider, dims=DIMS, shape=shape, dtype=dtype,
            make_inputs=lambda: _inputs(shape, dtype, bench_env.device),
            call=lambda args: fn(*args),
            bytes_moved=2 * rows * vocab * dtype.itemsize + rows * 4,
        )
