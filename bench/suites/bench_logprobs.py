"""logprobs_from_logits, forward and forward + backward: provider × shape × dtype.

Bytes that must move, N = B·T rows of V logits, s bytes each: the forward reads the logits
once, N·V·s (+ 12 bytes a row: label, result); forward + backward reads them again and writes
their gradient, 3·N·V·s (+ 16 bytes a row). DESIGN.md §6 bars at N=16384, V=151936, bf16:
forward ≥ 85 % of that floor and ≥ 8× eager; forward + backward ≥ 4× eager with extra memory
≤ one bf16 [N, V].

The liger provider is liger-kernel's cross-entropy with reduction="none", negated (−CE = the
label's log-prob): the nearest thing it ships; it has no temperature. Its forward already
computes the gradient and writes it over the input logits (its memory trick; checked with
liger-kernel 0.8.5 under the Triton interpreter), so its forward row times a forward +
backward's work. fastppo-inplace (forward + backward only) writes the gradient over the logits
in the backward, as the trainer does with its LM head's output: no second [N, V] buffer. Both
leave gradients in the rotated inputs, which does not change the timing.
"""

import pytest
import torch

import harness
from fastppo import ops, reference

DIMS = "BTV"
PROVIDERS = ("eager", "reference", "compile", "fastppo", "fastppo-inplace", "liger")
SHAPES = {
    "gpu": [(4, 1024, 151936), (4, 2048, 151936), (4, 4096, 151936)],  # N = 4096 … 16384 (§6: 16384)
    "cpu": [(2, 32, 32000), (2, 128, 32000), (2, 256, 32000)],
    "smoke": [(2, 8, 1000)],
}
DTYPES = {
    "gpu": [torch.bfloat16, torch.float32],
    "cpu": [torch.float32, torch.bfloat16],
    "smoke": [torch.bfloat16],
}


def _liger_logprobs():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    cross_entropy = LigerCrossEntropyLoss(reduction="none")

    def logprobs(logits, labels):
        flat = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return -flat.view(labels.shape)

    return logprobs


def _implementation(provider):
    return harness.implementation(
        provider,
        eager=reference.logprobs_from_logits,
        reference=lambda logits, labels: ops.logprobs_from_logits(logits, labels, backend="torch"),
        fastppo=lambda logits, labels: ops.logprobs_from_logits(logits, labels, backend="triton"),
        liger=_liger_logprobs,
        fastppo_inplace=lambda logits, labels: ops.logprobs_from_logits(logits, labels, backend="triton",
                                                                        inplace_backward=True),
    )


def _inputs(shape, dtype, device, backward: bool):
    batch, length, vocab = shape
    logits = torch.randn(batch, length, vocab, dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (batch, length), device=device)
    if not backward:
        return logits, labels
    grad = torch.randn(batch, length, device=device)  # a non-unit upstream gradient
    return logits.requires_grad_(), labels, grad


def bench_logprobs_fwd(benchmark, bench_env, provider, shape, dtype):
    if provider == "fastppo-inplace":
        pytest.skip("the forward is fastppo's; inplace_backward changes only the backward")
    fn = _implementation(provider)
    rows, vocab = shape[0] * shape[1], shape[2]
    harness.run_case(
        benchmark, bench_env, group="logprobs_fwd", provider=provider, dims=DIMS, shape=shape, dtype=dtype,
        make_inputs=lambda: _inputs(shape, dtype, bench_env.device, backward=False),
        call=lambda args: fn(args[0], args[1]),
        bytes_moved=rows * vocab * dtype.itemsize + rows * 12,
    )


def bench_logprobs_fwd_bwd(benchmark, bench_env, provider, shape, dtype):
    fn = _implementation(provider)
    rows, vocab = shape[0] * shape[1], shape[2]
    harness.run_case(
        benchmark, bench_env, group="logprobs_fwd_bwd", provider=provider, dims=DIMS, shape=shape, dtype=dtype,
        make_inputs=lambda: _inputs(shape, dtype, bench_env.device, backward=True),
        call=lambda args: torch.autograd.grad(fn(args[0], args[1]), args[0], args[2]),
        bytes_moved=3 * rows * vocab * dtype.itemsize + rows * 16,
    )
