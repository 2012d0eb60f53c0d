"""Compile every Triton kernel for an H100 (sm_90) without a GPU: registers, spills, load widths.

    python bench/tools/compile_sm90.py [--arch 90] [--out compile.json]

Runs each op of fastppo.kernels on small CPU tensors with the launch configuration a GPU gets
(`_launch.is_interpreted` answers False), but every `kernel[grid](...)` launch is compiled
ahead of time for the target instead of run: triton's own argument binding and
specialisation, then `triton.compile` to a cubin, and `cuobjdump --dump-resource-usage`
(shipped with triton) on it. Prints one row per (kernel, constexpr configuration) and exits
non-zero if a kernel fails to compile or spills registers to local memory. What the GPU
would do with the binary (speed, correctness) is for bench/tools/sweep.py on a lent GPU.

Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_sm90.py: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fastppo.kernels import _launch  # noqa: E402
from fastppo.op_outputs import PPOLossSettings  # noqa: E402

RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
GLOBAL_LOAD = re.compile(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[a-z](\d+)\s")


def cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class AheadOfTime:
    """Replaces `JITFunction.__getitem__`: a launch compiles for `target` and records the result."""

    def __init__(self, target: GPUTarget):
        self.target, self.backend = target, make_backend(target)
        self.rows, self.seen = [], set()
        self.case = ""  # what the launches being compiled stand for, set by the caller

    def compile(self, kernel: JITFunction, args, kwargs) -> None:
        binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound_args, specialization,
                                                                  options)
        config = {str(kernel.params[path[0]].name): value for path, value in constexprs.items()}
        config["num_warps"] = options.num_warps
        config["dtypes"] = "/".join(sorted({t[1:] for t in signature.values() if isinstance(t, str)
                                            and t.startswith("*")}))
        key = (kernel.fn.__name__, self.case, json.dumps(config, sort_keys=True, default=str))
        if key in self.seen:
            return
        self.seen.add(key)
        row = {"kernel": kernel.fn.__name__, "case": self.case, "config": config}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=self.target,
                                      options=options.__dict__)
            row.update(resource_usage(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared,
                       load_widths=global_load_widths(compiled.asm["ptx"]), ok=True)
        except Exception as exc:  # noqa: BLE001 - a compile failure is this tool's finding
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        self.rows.append(row)

    @contextlib.contextmanager
    def installed(self):
        original = JITFunction.__getitem__
        tool = self

        def getitem(kernel, grid):
            return lambda *args, **kwargs: tool.compile(kernel, args, kwargs)

        JITFunction.__getitem__ = getitem
        try:
            yield self
        finally:
            JITFunction.__getitem__ = original


def global_load_widths(ptx: str) -> list:
    """Bytes per thread of each kind of global-memory load in the PTX, e.g. [8, 16]: 16 is one
    128-bit vector load (what a streamed row wants); 2 is bf16 element by element."""
    return sorted({int(vector or 1) * int(bits) // 8 for vector, bits in GLOBAL_LOAD.findall(ptx)})


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", handle.name], capture_output=True, text=True,
                              check=True).stdout
    match = RESOURCE_LINE.search(text)
    if match is None:
        return {"registers": None, "stack": None, "local": None}
    registers, stack, _shared, local = (int(g) for g in match.groups())
    return {"registers": registers, "stack": stack, "local": local}


def exercise_every_kernel(tool: AheadOfTime) -> None:
    """Each op once, forward and backward, on shapes that pick the GPU heuristics' large blocks.

    The kernel modules are called directly: fastppo.ops refuses Triton for CPU tensors outside
    the interpreter, and nothing here runs anyway.
    """
    from fastppo.kernels import kernel_for

    generator = torch.Generator().manual_seed(0)
    # A vocabulary that is not a multiple of 16 (GPT-2's 50257): rows start off 16-byte boundaries
    # and end ragged. The vocab kernels still stream the blocks between a row's first and last
    # with 128-bit loads. The others are multiples of 16, as Llama's 128256 and Qwen2's 151936 are.
    tool.case = "V=5001, rows off 16-byte boundaries"
    odd = torch.randn(3, 5001, generator=generator).bfloat16()
    kernel_for("logprobs_from_logits")(odd, torch.randint(0, 5001, (3,), generator=generator))
    kernel_for("full_kl")(odd, odd * 0.5)
    tool.case = "V=5120"
    for dtype in (torch.bfloat16, torch.float32):
        logits = torch.randn(4, 3, 5120, generator=generator).to(dtype).requires_grad_()
        labels = torch.randint(0, 5120, (4, 3), generator=generator)
        for inplace in (False, True):
            logp, entropy = kernel_for("logprobs_from_logits")(logits[:, :2], labels[:, :2], 1.0, True, inplace)
            torch.autograd.grad((logp, entropy), logits, (torch.ones_like(logp), torch.ones_like(entropy)))
        kernel_for("full_kl")(logits.detach(), logits.detach() * 0.5)
        hidden = torch.randn(40, 16, generator=generator).to(dtype).requires_grad_()
        weight = torch.randn(5120, 16, generator=generator).to(dtype).requires_grad_()
        logp = kernel_for("linear_logprobs")(hidden, weight, torch.randint(0, 5120, (40,), generator=generator),
                                             chunk_size=16)
        torch.autograd.grad(logp.sum(), (hidden, weight))
    for shape in ((64, 8192), (3, 100)):
        tool.case = f"[B, T] = {list(shape)}"
        tensors = [torch.randn(shape, generator=generator) for _ in range(6)]
        mask = torch.ones(shape, dtype=torch.bool)
        scores = torch.randn(shape[0], generator=generator)
        for estimator in ("kl", "abs", "mse", "k3"):
            kernel_for("kl_penalty_rewards")(tensors[0], tensors[1], mask, scores, 0.1, estimator, None)
        kernel_for("kl_penalty_rewards")(tensors[0], tensors[1], mask, scores, 0.1, "full", tensors[2])
        kernel_for("gae")(tensors[0], tensors[1], mask, 1.0, 0.95)
        for shift_mean in (True, False):
            kernel_for("masked_whiten")(tensors[2], mask, shift_mean)
        # dual clip, and the truncated importance weights of rollout log-probs (here bf16, as an engine's)
        for dual_clip, rollout in ((None, None), (3.0, None), (None, tensors[5].bfloat16()), (3.0, tensors[5])):
            leaves = [tensors[0].clone().requires_grad_(), tensors[2].clone().requires_grad_()]
            out = kernel_for("ppo_loss")(leaves[0], tensors[1], leaves[1], *tensors[3:], mask, 0.2, 0.2, 0.1,
                                         dual_clip=dual_clip, rollout_logprobs=rollout)
            torch.autograd.grad(out.loss, leaves)
        # the objectives beyond TRL's: per-token loss weights, GSPO's sequence ratio (with its row reduction)
        weights = mask.float() / shape[1]
        for level, loss_weights in (("sequence", None), ("token", weights), ("sequence", weights.bfloat16())):
            leaves = [tensors[0].clone().requires_grad_(), tensors[2].clone().requires_grad_()]
            settings = PPOLossSettings(importance_sampling_level=level)
            out = kernel_for("ppo_loss")(leaves[0], tensors[1], leaves[1], *tensors[3:], mask, settings=settings,
                                         loss_weights=loss_weights)
            torch.autograd.grad(out.loss, leaves)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100/H200)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    tool = AheadOfTime(GPUTarget("cuda", args.arch, 32))
    _launch.is_interpreted = lambda device: False  # the GPU's blocks, tiles and warps
    with tool.installed():
        exercise_every_kernel(tool)
    print(f"triton {triton.__version__}, target sm_{args.arch}: {len(tool.rows)} kernel configurations")
    print("| kernel | inputs | configuration | registers | spilled (local bytes) | shared bytes | load widths (bytes) |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(tool.rows, key=lambda r: (r["kernel"], r["case"], json.dumps(r["config"], sort_keys=True,
                                                                                  default=str))):
        config = ", ".join(f"{k}={v}" for k, v in sorted(row["config"].items()))
        if row["ok"]:
            print(f"| {row['kernel']} | {row['case']} | {config} | {row['registers']} | {row['local']} | "
                  f"{row['shared_bytes']} | {', '.join(map(str, row['load_widths']))} |")
        else:
            print(f"| {row['kernel']} | {row['case']} | {config} | **failed**: {row['error']} | | | |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"triton": triton.__version__, "arch": args.arch, "rows": tool.rows}, handle, indent=1,
                      default=str)
    return 0 if all(row["ok"] and not row["local"] for row in tool.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
