"""kl_penalty_rewards (per-token −kl_coef·KL, score at the last response token): provider × shape × dtype.

Bytes that must move per token, fp32 log-probs and a bool mask: read logprobs, ref_logprobs
(4 + 4) and the mask (1), write rewards and kl (4 + 4): 17 bytes (+ 4 per row for scores).
Launch-bound: eager PyTorch runs a dozen small kernels (and a boolean index), the kernel one.
DESIGN.md §6 bar at 1M tokens: ≥ 3× eager, ≥ 1.5× torch.compile. Estimator "kl" (TRL's default).
"""

import torch

import harness
from fastppo import ops, reference

DIMS = "BT"
PROVIDERS = ("eager", "reference", "compile", "fastppo")
SHAPES = {
    "gpu": [(64, 2048), (64, 4096), (64, 8192), (64, 16384)],  # 128k … 1M tokens (§6: 1M)
    "cpu": [(8, 256), (8, 1024), (8, 4096)],
    "smoke": [(2, 16)],
}
DTYPES = {"gpu": [torch.float32], "cpu": [torch.float32], "smoke": [torch.float32]}
KL_COEF, ESTIMATOR = 0.2, "kl"


def _implementation(provider):
    def call_ops(backend):
        return lambda lp, ref, mask, scores: ops.kl_penalty_rewards(lp, ref, mask, scores, KL_COEF, ESTIMATOR,
                                                                    backend=backend)

    return harness.implementation(
        provider,
        eager=lambda lp, ref, mask, scores: reference.kl_penalty_rewards(lp, ref, mask, scores, KL_COEF, ESTIMATOR),
        reference=call_ops("torch"),
        fastppo=call_ops("triton"),
    )


def _inputs(shape, dtype, device):
    generator = torch.Generator().manual_seed(0)
    batch, length = shape
    logprobs = -5 * torch.rand(shape, device=device).to(dtype)
    ref_logprobs = logprobs - 0.1 * torch.randn(shape, device=device).to(dtype)
    mask = harness.random_mask(batch, length, device, generator)
    scores = torch.randn(batch, device=device)
    return logprobs, ref_logprobs, mask, scores


def bench_kl_reward(benchmark, bench_env, provider, shape, dtype):
    fn = _implementation(provider)
    tokens = shape[0] * shape[1]
    with torch.no_grad():
        harness.run_case(
            benchmark, bench_env, group="kl_reward", provider=provider, dims=DIMS, shape=shape, dtype=dtype,
            make_inputs=lambda: _inputs(shape, dtype, bench_env.device),
            call=lambda args: fn(*args),
            bytes_moved=tokens * (2 * dtype.itemsize + harness.MASK_DTYPE.itemsize + 8) + shape[0] * 4,
        )
