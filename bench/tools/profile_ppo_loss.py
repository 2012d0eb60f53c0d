"""Where ppo_loss forward + backward spends its time on a GPU: kernels against host overhead.

    python bench/tools/profile_ppo_loss.py [B T]  # default 64 16384 (DESIGN.md §6: 1M tokens)

The sweep on an H200 timed it at 0.55–0.9 ms for ~37 MB of traffic (1–2 % of a device copy's
rate), so the time is not in moving bytes. This prints the CUDA time of each kernel (torch
profiler), the do_bench median of the whole call, and the host time of one call when the
GPU is idle: the gap between the kernels' sum and the median is launch and Python overhead.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from fastppo import ops


def main() -> None:
    shape = tuple(int(a) for a in sys.argv[1:3]) or (64, 16384)
    device = torch.device("cuda")
    tensors = [0.3 * torch.randn(shape, device=device) for _ in range(6)]
    mask = torch.rand(shape, device=device) < 0.9
    logp, values = tensors[0].clone().requires_grad_(), tensors[2].clone().requires_grad_()

    def call(backend="triton"):
        out = ops.ppo_loss(logp, tensors[1], values, tensors[3], tensors[4], tensors[5], mask, 0.2, 0.2, 0.1,
                           backend=backend)
        return torch.autograd.grad(out.loss, (logp, values))

    for backend in ("triton", "torch"):
        median = do_bench(lambda: call(backend), warmup=25, rep=300, return_mode="median")
        torch.cuda.synchronize()
        start = time.perf_counter()
        call(backend)
        host = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        print(f"{backend}: do_bench median {median:.3f} ms; one call's host time {host:.3f} ms (GPU idle before)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
