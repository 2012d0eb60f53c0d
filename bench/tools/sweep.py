"""Sweep the kernels' launch knobs (kernels/_launch.py) on a GPU: check, time, print one table.

    python bench/tools/sweep.py [--ops logprobs,full_kl,tokens,linear] [--out sweep.json]
    python bench/tools/sweep.py --smoke      # tiny shapes under the Triton interpreter: proves it runs

The heuristics in kernels/_launch.py were chosen, not measured. Per op, every configuration
below runs at DESIGN.md §6's shape: its output is first checked against fastppo.reference
(outputs poisoned with NaN beforehand, inputs random, never zeros), then timed with
`triton.testing.do_bench` (median; L2 flushed before each call), and reported as ms, GB/s and
% of a device-to-device copy measured in the same run (for linear_logprobs: % of a bf16
matmul's rate, and the peak memory beyond inputs and gradients). Knobs:

- vocabulary kernels (logprobs forward and backward, full_kl): columns per block ×
  elements per thread (num_warps = block / (32 · elements));
- token kernels (kl rewards, GAE, whitening, ppo_loss): elements per tile × elements per thread;
- linear_logprobs: logits per chunk (bytes of the one buffer) × the backward's split.

Print the table last; pick the best row per op and set it in kernels/_launch.py with the
figure in bench/RESULTS.md (the H200 sweep is bench/results/gpu/sweep-h200.json). Under `--smoke`
(CPU) the GPU configurations run through the interpreter (`is_interpreted` answers False, so the
knobs apply): the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "suites"))  # machine.py, shared with the suites

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

import machine  # noqa: E402  (bench/suites/)
from fastppo import ops, reference  # noqa: E402
from fastppo.kernels import _launch  # noqa: E402

VOCAB_CONFIGS = [(1024, 8), (2048, 8), (2048, 16), (4096, 8), (4096, 16), (8192, 8), (8192, 16)]  # (block, ept)
TOKEN_CONFIGS = [(1024, 8), (2048, 4), (2048, 8), (4096, 8), (8192, 8)]  # (tile, ept)
LINEAR_CONFIGS = [(2**26, "vocab"), (2**27, "vocab"), (2**28, "vocab"), (2**27, "tokens")]  # (logits, split)
SHAPES = {  # GPU: DESIGN.md §6; smoke: tiny, but more than one block and tile
    "gpu": dict(logprobs=(16384, 151936), full_kl=(8192, 128256), tokens=(64, 16384), gae=(64, 8192),
                linear=(32768, 4096, 128256)),
    "smoke": dict(logprobs=(4, 5000), full_kl=(3, 5000), tokens=(3, 300), gae=(3, 300), linear=(40, 16, 5000)),
}


@contextlib.contextmanager
def knobs(**values):
    """Set kernels/_launch.py module constants for the duration (the launchers read them per call)."""
    saved = {name: getattr(_launch, name) for name in values}
    for name, value in values.items():
        setattr(_launch, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_launch, name, value)


class Clock:
    """do_bench median on CUDA; one perf_counter call under --smoke on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def ms(self, fn) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=200, return_mode="median")
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def close(got, expected, rtol, atol) -> bool:
    got, expected = got.float(), expected.float()
    return bool(torch.isfinite(got).all()) and torch.allclose(got, expected, rtol=rtol, atol=atol)


def near(got, exact, bound: float) -> bool:
    """‖got − exact‖ / ‖exact‖ ≤ bound (exact: float32 math), and nothing NaN or infinite."""
    got, exact = got.float(), exact.float()
    return bool(torch.isfinite(got).all()) and float((got - exact).norm() / exact.norm()) <= bound


# --------------------------------------------------------------------------- one op: (check, time, bytes)


def vocab_cases(shape, device):
    n_rows, vocab = shape
    logits = torch.randn(n_rows, vocab, device=device, dtype=torch.bfloat16) * 2
    other = torch.randn(n_rows, vocab, device=device, dtype=torch.bfloat16) * 2
    labels = torch.randint(0, vocab, (n_rows,), device=device)
    grad_out = torch.randn(n_rows, device=device)
    rows = slice(0, min(n_rows, 256))  # the reference on a slice of rows: [256, V] float32
    size = n_rows * vocab * 2

    def forward():
        return ops.logprobs_from_logits(logits, labels, backend="triton")

    def check_forward():
        got = forward()[rows]
        return close(got, reference.logprobs_from_logits(logits[rows], labels[rows]), 1e-4, 1e-4)

    leaf = logits.clone().requires_grad_()

    def backward():
        return torch.autograd.grad(ops.logprobs_from_logits(leaf, labels, backend="triton"), leaf, grad_out)[0]

    def check_backward():
        got = backward()[rows]
        small = logits[rows].clone().requires_grad_()
        (expected,) = torch.autograd.grad(reference.logprobs_from_logits(small, labels[rows]), small,
                                          grad_out[rows])
        return close(got, expected, 2e-2, 1e-5)

    def kl():
        return ops.full_kl(logits, other, backend="triton")

    def check_kl():
        return close(kl()[rows], reference.full_kl(logits[rows], other[rows]), 1e-3, 1e-4)

    return {"logprobs_fwd": (check_forward, forward, size), "logprobs_fwd_bwd": (check_backward, backward, 3 * size),
            "full_kl": (check_kl, kl, 2 * size)}


def token_cases(shape, gae_shape, device):
    def inputs(s):
        tensors = [0.3 * torch.randn(s, device=device) for _ in range(6)]
        mask = torch.rand(s, device=device) < 0.9
        mask[:, 0] = True
        return tensors, mask

    (logp, ref_logp, values, old_values, advantages, returns), mask = inputs(shape)
    scores = torch.randn(shape[0], device=device)
    tokens = shape[0] * shape[1]
    (g_rewards, g_values, *_), g_mask = inputs(gae_shape)

    def rewards():
        return ops.kl_penalty_rewards(logp, ref_logp, mask, scores, 0.2, "kl", backend="triton")

    def check_rewards():
        expected = reference.kl_penalty_rewards(logp, ref_logp, mask, scores, 0.2, "kl")
        return all(close(g, e, 1e-5, 1e-6) for g, e in zip(rewards(), expected))

    def gae():
        return ops.gae(g_rewards, g_values, g_mask, 1.0, 0.95, backend="triton")

    def check_gae():
        return all(close(g, e, 1e-4, 1e-5) for g, e in zip(gae(), reference.gae(g_rewards, g_values, g_mask, 1.0, 0.95)))

    def whiten():
        return ops.masked_whiten(values, mask, backend="triton")

    def check_whiten():
        return close(whiten(), reference.masked_whiten(values, mask), 1e-4, 1e-5)

    leaves = [logp.clone().requires_grad_(), values.clone().requires_grad_()]

    def loss(backend="triton", tensors=leaves):
        out = ops.ppo_loss(tensors[0], ref_logp, tensors[1], old_values, advantages, returns, mask, 0.2, 0.2, 0.1,
                           backend=backend)
        return torch.autograd.grad(out.loss, tensors)

    def check_loss():
        return all(close(g, e, 1e-4, 1e-7) for g, e in zip(loss(), loss("torch", [t.detach().clone().requires_grad_()
                                                                                   for t in leaves])))

    gae_tokens = gae_shape[0] * gae_shape[1]
    return {"kl_reward": (check_rewards, rewards, 17 * tokens), "gae": (check_gae, gae, 17 * gae_tokens),
            "masked_whiten": (check_whiten, whiten, 9 * tokens), "ppo_loss_fwd_bwd": (check_loss, loss, 37 * tokens)}


def linear_case(shape, device):
    n_tokens, n_hidden, vocab = shape
    hidden = torch.randn(n_tokens, n_hidden, device=device, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, n_hidden, device=device) / n_hidden**0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (n_tokens,), device=device)
    grad_out = torch.randn(n_tokens, device=device)

    def run():
        logp = ops.linear_logprobs(hidden, weight, labels, backend="triton")
        return torch.autograd.grad(logp, (hidden, weight), grad_out)

    def check():
        # the hidden gradient of some rows against float32 math on those rows (bf16 inputs: ~4e-3 apart)
        rows = slice(0, min(n_tokens, 64))
        got = run()
        small = hidden[rows].detach().float().requires_grad_()
        logp = ops.linear_logprobs(small, weight.detach().float(), labels[rows], backend="torch")
        (exact,) = torch.autograd.grad(logp, small, grad_out[rows])
        return near(got[0][rows], exact, 1e-2) and bool(torch.isfinite(got[1]).all())

    return check, run, 8 * n_tokens * n_hidden * vocab


# --------------------------------------------------------------------------- main


def measure(name, config, check, run, clock, work, ceiling, unit) -> dict:
    row = {"op": name, "config": config}
    try:
        return _measured(row, check, run, clock, work, ceiling, unit)
    finally:  # one line as each row finishes: a sweep cut off by its time limit still reports what it measured
        print("row", json.dumps(row), flush=True)


def _measured(row, check, run, clock, work, ceiling, unit) -> dict:
    try:
        row["ok"] = check()
        row["ms"] = clock.ms(run)
        rate = work / (row["ms"] / 1e3) / (1e9 if unit == "GB/s" else 1e12)
        row.update(rate=rate, unit=unit, pct=100.0 * rate / ceiling)
    except Exception as exc:  # noqa: BLE001 - a config the compiler or the device refuses is a result too
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return row


def peak_extra(fn, device):
    """GB allocated at the peak of one call beyond what was live before it and its gradients (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before - sum(g.numel() * g.element_size() for g in grads)) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU through the interpreter")
    parser.add_argument("--ops", default="logprobs,full_kl,tokens,linear")
    parser.add_argument("--out", default=None, help="write every row as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: only --smoke runs on CPU")
    shapes = SHAPES["smoke" if args.smoke else "gpu"]
    clock = Clock(device)
    limits = machine.measure_ceilings(device, smoke=args.smoke)  # the same ceilings as bench/run.sh
    wanted = set(args.ops.split(","))
    rows = []
    with contextlib.ExitStack() as stack:
        if device.type != "cuda":  # the interpreter with the GPU heuristics (see the module docstring)
            stack.enter_context(knobs(is_interpreted=lambda device: False))
        cases = {}
        if wanted & {"logprobs", "full_kl"}:
            vocab = vocab_cases(shapes["logprobs"], device)
            cases.update({k: v for k, v in vocab.items() if k.startswith("logprobs") and "logprobs" in wanted})
            if "full_kl" in wanted:
                cases["full_kl"] = vocab_cases(shapes["full_kl"], device)["full_kl"]
        for name, (check, run, size) in cases.items():
            for block, ept in VOCAB_CONFIGS:
                with knobs(GPU_MAX_VOCAB_BLOCK=block, GPU_VOCAB_ELEMENTS_PER_THREAD=ept, GPU_MAX_WARPS=32):
                    config = f"block {block}, {block // (32 * ept)} warps"
                    rows.append(measure(name, config, check, run, clock, size, limits["copy_GBps"], "GB/s"))
        if "tokens" in wanted:
            for name, (check, run, size) in token_cases(shapes["tokens"], shapes["gae"], device).items():
                for tile, ept in TOKEN_CONFIGS:
                    with knobs(GPU_TOKEN_TILE=tile, GPU_TOKEN_ELEMENTS_PER_THREAD=ept, GPU_MAX_WARPS=32):
                        config = f"tile {tile}, {ept} per thread"
                        rows.append(measure(name, config, check, run, clock, size, limits["copy_GBps"], "GB/s"))
        if "linear" in wanted:
            check, run, flops = linear_case(shapes["linear"], device)
            for logits, split in LINEAR_CONFIGS:
                smoke_chunks = {}
                if device.type != "cuda":  # a few tokens per chunk, so that the tiny shape has several
                    smoke_chunks = dict(LINEAR_CHUNK_LOGITS_CPU=logits >> 12, LINEAR_CHUNK_MIN_TOKENS=1,
                                        LINEAR_CHUNK_MULTIPLE=1)
                with knobs(LINEAR_CHUNK_LOGITS_GPU=logits, LINEAR_BACKWARD_SPLIT=split, **smoke_chunks):
                    row = measure("linear_logprobs", f"{logits >> 20} Mi logits, {split} split", check, run, clock,
                                  flops, limits["matmul_TFLOPs"], "TFLOP/s")
                    row["peak_extra_GB"] = peak_extra(run, device)
                    rows.append(row)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (interpreter, smoke)'}; "
          f"copy {limits['copy_GBps']:.0f} GB/s, {limits['matmul_dtype']} matmul {limits['matmul_TFLOPs']:.1f} TFLOP/s")
    print("| op | config | ok | ms | rate | % of ceiling | peak extra GB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        rate = f"{row['rate']:.1f} {row['unit']}" if "rate" in row else row.get("error", "")
        pct = f"{row['pct']:.1f}" if "pct" in row else "—"
        ms = f"{row['ms']:.3f}" if "ms" in row else "—"
        extra = f"{row['peak_extra_GB']:.2f}" if row.get("peak_extra_GB") is not None else "—"
        print(f"| {row['op']} | {row['config']} | {'yes' if row['ok'] else '**NO**'} | {ms} | {rate} | {pct} | {extra} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": str(device), "ceilings": limits, "rows": rows}, handle, indent=1)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
