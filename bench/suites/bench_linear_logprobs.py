"""linear_logprobs (log-probs straight from hidden states and the LM head), forward + backward.

Gradients w.r.t. hidden and weight, N = B·T tokens, H hidden, V vocabulary. FLOPs: the
forward matmul 2·N·H·V, backward 6·N·H·V with the logits recomputed: 8·N·H·V, the "matmul
floor" of DESIGN.md §6 (% matmul = (8·N·H·V / measured matmul rate) / median). Bytes that
must move: read hidden and weight, write their gradients. §6 bars at N=32768, H=4096,
V=128256, bf16: peak extra ≤ 2 GB (eager ≥ 25 GB), ≤ 1.25× the matmul floor.

eager is what a TRL user runs: `hidden @ weight.T` → [N, V] logits → `logits.float()`,
log_softmax, gather. reference is fastppo's chunked fallback (backend="torch"). liger is
liger-kernel's fused linear cross-entropy (reduction="none", negated), when installed.
"""

import torch

import harness
from fastppo import ops, reference

DIMS = "BTHV"
PROVIDERS = ("eager", "reference", "compile", "fastppo", "liger")
SHAPES = {
    "gpu": [(8, 1024, 4096, 128256), (8, 2048, 4096, 128256), (8, 4096, 4096, 128256)],  # §6: N=32768
    "cpu": [(2, 64, 256, 8192), (2, 128, 256, 8192), (2, 256, 256, 8192)],
    "smoke": [(2, 8, 32, 1000)],
}
DTYPES = {"gpu": [torch.bfloat16], "cpu": [torch.float32], "smoke": [torch.bfloat16]}


def _eager(hidden, weight, labels):
    logits = torch.nn.functional.linear(hidden, weight)  # the model's lm_head: [N, V] in the input dtype
    return reference.logprobs_from_logits(logits, labels)


def _liger_linear_logprobs():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    cross_entropy = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def logprobs(hidden, weight, labels):
        flat = cross_entropy(weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))
        return -flat.view(labels.shape)

    return logprobs


def _implementation(provider):
    return harness.implementation(
        provider,
        eager=_eager,
        reference=lambda hidden, weight, labels: ops.linear_logprobs(hidden, weight, labels, backend="torch"),
        fastppo=lambda hidden, weight, labels: ops.linear_logprobs(hidden, weight, labels, backend="triton"),
        liger=_liger_linear_logprobs,
    )


def _inputs(shape, dtype, device):
    batch, length, n_hidden, vocab = shape
    hidden = torch.randn(batch, length, n_hidden, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, n_hidden, device=device) / n_hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), device=device)
    grad = torch.randn(batch, length, device=device)  # a non-unit upstream gradient
    return hidden, weight, labels, grad


def bench_linear_logprobs(benchmark, bench_env, provider, shape, dtype):
    fn = _implementation(provider)
    batch, length, n_hidden, vocab = shape
    tokens = batch * length
    harness.run_case(
        benchmark, bench_env, group="linear_logprobs", provider=provider, dims=DIMS, shape=shape, dtype=dtype,
        make_inputs=lambda: _inputs(shape, dtype, bench_env.device),
        call=lambda args: torch.autograd.grad(fn(args[0], args[1], args[2]), (args[0], args[1]), args[3]),
        bytes_moved=2 * (tokens * n_hidden + vocab * n_hidden) * dtype.itemsize + tokens * 12,
        flops=8 * tokens * n_hidden * vocab,
    )
