"""ppo_loss (clipped policy + value loss and its statistics), forward + backward: provider × shape × dtype.

Bytes that must move per token, fp32 and a bool mask: read six [B, T] inputs (24) and the
mask (1), write the ratio (4) and the two gradients, d/dlogprobs and d/dvalues (8): 37 bytes.
(fastppo's kernels read the inputs twice, forward and backward — 66 bytes — so its ceiling
is ~56 % of this floor.) Launch-bound: eager autograd runs ~40 kernels each way.
DESIGN.md §6 bar at 1M tokens: ≥ 3× eager, ≥ 1.5× torch.compile.
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
CLIPRANGE, CLIPRANGE_VALUE, VF_COEF = 0.2, 0.2, 0.1


def _implementation(provider):
    def call_ops(backend):
        return lambda *tensors: ops.ppo_loss(*tensors, CLIPRANGE, CLIPRANGE_VALUE, VF_COEF, backend=backend)

    return harness.implementation(
        provider,
        eager=lambda *tensors: reference.ppo_loss(*tensors, CLIPRANGE, CLIPRANGE_VALUE, VF_COEF),
        reference=call_ops("torch"),
        fastppo=call_ops("triton"),
    )


def _inputs(shape, dtype, device):
    generator = torch.Generator().manual_seed(0)
    old_logprobs = (-5 * torch.rand(shape, device=device)).to(dtype)
    logprobs = (old_logprobs + 0.2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()  # some clipped
    old_values = torch.randn(shape, device=device).to(dtype)
    values = (old_values + 0.3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    advantages = torch.randn(shape, device=device).to(dtype)
    returns = torch.randn(shape, device=device).to(dtype)
    mask = harness.random_mask(*shape, device, generator)
    return logprobs, old_logprobs, values, old_values, advantages, returns, mask


def _loss_and_grads(fn, args):
    logprobs, values = args[0], args[2]
    out = fn(*args)
    return torch.autograd.grad(out.loss, (logprobs, values)), out.ratio


def bench_ppo_loss_fwd_bwd(benchmark, bench_env, provider, shape, dtype):
    fn = _implementation(provider)
    tokens = shape[0] * shape[1]
    harness.run_case(
        benchmark, bench_env, group="ppo_loss_fwd_bwd", provider=provider, dims=DIMS, shape=shape, dtype=dtype,
        make_inputs=lambda: _inputs(shape, dtype, bench_env.device),
        call=lambda args: _loss_and_grads(fn, args),
        bytes_moved=tokens * (6 * dtype.itemsize + harness.MASK_DTYPE.itemsize + 4 + 2 * dtype.itemsize),
    )


def _gspo_implementation(provider):
    """GSPO's sequence ratio with seq-mean-token-mean weights (the loss weights made once, outside the timing)."""
    settings = ops.PPOLossSettings(CLIPRANGE, CLIPRANGE_VALUE, VF_COEF, importance_sampling_level="sequence")

    def call_ops(backend):
        return lambda *tensors: ops.ppo_loss(*tensors[:7], backend=backend, settings=settings, loss_weights=tensors[7])

    return harness.implementation(
        provider,
        eager=lambda *tensors: reference.ppo_loss(*tensors[:7], settings=settings, loss_weights=tensors[7]),
        reference=call_ops("torch"),
        fastppo=call_ops("triton"),
    )


def bench_ppo_loss_gspo_fwd_bwd(benchmark, bench_env, provider, shape, dtype):
    """The same loss with GSPO's objective: one more [B, T] read per pass (the weights) and a per-row reduction."""
    fn = _gspo_implementation(provider)
    tokens = shape[0] * shape[1]

    def make_inputs():
        tensors = _inputs(shape, dtype, bench_env.device)
        return tensors + (reference.loss_aggregation_weights(tensors[6], "seq-mean-token-mean"),)

    harness.run_case(
        benchmark, bench_env, group="ppo_loss_gspo_fwd_bwd", provider=provider, dims=DIMS, shape=shape, dtype=dtype,
        make_inputs=make_inputs,
        call=lambda args: _loss_and_grads(fn, args),
        bytes_moved=tokens * (7 * dtype.itemsize + 4 + harness.MASK_DTYPE.itemsize + 4 + 2 * dtype.itemsize),
    )
