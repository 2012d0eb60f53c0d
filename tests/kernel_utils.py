"""Helpers shared by the Triton kernel tests: where kernels run, float64 oracles, error bars, allocations.

Kernel tests run on CUDA when there is a GPU, else on CPU tensors under the Triton
interpreter: a kernel test module starts with

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

and can fail fast with `interpreter_unusable()` when that came too late.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tolerances import tol

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreter_unusable() -> Optional[str]:
    """Why kernels cannot run under the Triton interpreter in this process, or None if they can.

    Without CUDA the kernel tests set `TRITON_INTERPRET=1` before importing triton: the flag is
    read when `@triton.jit` decorates a function, and that includes triton's own `tl.sum`,
    `tl.max`, ... decorated when triton is first imported. If something imported triton
    earlier (`import fastppo` does, through transformers → torch._dynamo), those stay
    compiled-mode functions and every interpreted kernel fails inside them.
    """
    if ON_GPU:
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET=1 is not set"
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(tl.sum, JITFunction):
        return ("triton was imported before TRITON_INTERPRET=1 was set (e.g. by `import fastppo` in an earlier "
                "test module), so its library functions cannot be interpreted: set TRITON_INTERPRET in "
                "tests/conftest.py before anything imports triton")
    return None


# --------------------------------------------------------------------------- float64 oracles
# fastppo.reference always computes in float32 (it calls .float()); these are the exact math.


def logprobs_float64(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """(logp, entropy) of softmax(logits / T) in float64, differentiable w.r.t. `logits`."""
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    picked = logp_all.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return picked, entropy


def full_kl_float64(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    logq = torch.log_softmax(ref_logits.double(), dim=-1)
    p = logp.exp()
    return (p * torch.where(p > 0, logp - logq, 0.0)).sum(-1)


def assert_within_twice_reference_error(
    kernel: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor, atol: Optional[float] = None
) -> None:
    """flash-attention's bar: |kernel − exact| ≤ 2·|reference − exact| + atol, as max-abs errors.

    `reference` is eager PyTorch on the same inputs (fastppo.reference), `exact` a float64
    oracle; atol defaults to the float32 row of the tolerance table.
    """
    atol = tol(torch.float32)["atol"] if atol is None else atol
    kernel_error = (kernel.double() - exact.double()).abs().max().item()
    reference_error = (reference.double() - exact.double()).abs().max().item()
    assert kernel_error <= 2 * reference_error + atol, (
        f"kernel error {kernel_error:.3g} > 2 × reference error {reference_error:.3g} + {atol:.1g}")


def assert_within_one_ulp(kernel: torch.Tensor, exact: torch.Tensor, atol: Optional[float] = None) -> None:
    """Every element of a half-precision `kernel` result within one ulp of `exact` (+ atol).

    For outputs computed in float32 and rounded once to bf16/fp16: rounding to nearest is
    half an ulp, truncation (the Triton interpreter's float32→bfloat16 cast) one.
    """
    atol = tol(torch.float32)["atol"] if atol is None else atol
    bound = torch.finfo(kernel.dtype).eps * exact.double().abs() + atol
    excess = (kernel.double() - exact.double()).abs() - bound
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} elements beyond one ulp, worst by {excess.max().item():.3g}"


# --------------------------------------------------------------------------- allocations


def new_outputs(args, kwargs, out):
    """The strided tensors among an op's outputs whose storage is none of its inputs' (new memory)."""
    input_storages = {leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs))
                      if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided}
    return [tensor for tensor in tree_leaves(out) if isinstance(tensor, torch.Tensor)
            and tensor.layout == torch.strided and tensor.untyped_storage().data_ptr() not in input_storages]


class LargeAllocations(TorchDispatchMode):
    """Record every op that creates new storage of at least `min_numel` elements.

    Views, in-place ops and outputs that reuse an input's storage are not allocations. Use it
    to show that a kernel launcher neither copies an `[N, V]` input nor allocates a second
    `[N, V]` buffer: `with LargeAllocations(n * v // 2) as rec: ...; assert not rec.found`.
    """

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel = min_numel
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for tensor in new_outputs(args, kwargs, out):
            if tensor.numel() >= self.min_numel:
                self.found.append((str(func), tuple(tensor.shape)))
        return out


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of storage created inside the block and alive at the same time (CPU or GPU).

    What `torch.cuda.max_memory_allocated` minus the inputs measures on a GPU, for any device:
    every op output whose storage is new (not one of the op's inputs) is counted until Python
    frees it (checked before each op). Allocations inside one op (a matmul's workspace) are not
    seen; neither is memory that never becomes a tensor.
    """

    def __init__(self):
        super().__init__()
        self.live = {}  # data_ptr → (weak ref to the storage, bytes)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for key, (ref, n_bytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= n_bytes
        out = func(*args, **kwargs)
        for tensor in new_outputs(args, kwargs, out):
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return out


def spy_on(monkeypatch, module, name):
    """Count calls of `module.name` (ops looks kernels up there); returns the list of calls."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs))
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # ops reads it per call
    return calls


@pytest.fixture(autouse=True)
def kernels_can_run():
    """Autouse in every module that imports it: fail (not skip) when the interpreter cannot run
    kernels in this process, which is a set-up bug."""
    reason = interpreter_unusable()
    if reason is not None:
        pytest.fail(reason)
