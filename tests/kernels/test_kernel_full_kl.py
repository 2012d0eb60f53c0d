"""kernels/full_kl.py against fastppo.reference and a float64 oracle: CPU under the interpreter, or CUDA."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (see kernel_utils)
pytest.importorskip("triton")

import fastppo.kernels._launch as launch  # noqa: E402
from fastppo import ops, reference  # noqa: E402
from fastppo.kernels.full_kl import full_kl  # noqa: E402
from kernel_utils import kernels_can_run  # noqa: E402,F401 (kernels_can_run: autouse fixture)
from kernel_utils import (  # noqa: E402
    DEVICE,
    FLOAT_DTYPES,
    ON_GPU,
    LargeAllocations,
    assert_within_twice_reference_error,
    full_kl_float64,
)
from tolerances import tol  # noqa: E402

# The interpreter evaluates both branches of tl.where on padding lanes (−inf − −inf) in numpy.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")




@pytest.fixture()
def small_blocks(monkeypatch):
    """Force 64-column blocks so that small vocabularies exercise the multi-block online path."""
    monkeypatch.setattr(launch, "INTERPRETER_MAX_VOCAB_BLOCK", 64)
    monkeypatch.setattr(launch, "GPU_MAX_VOCAB_BLOCK", 64)


def make_pair(shape, vocab, dtype, spread=1.0, seed=0):
    """Policy logits and reference logits that differ by `spread`·noise (KL of order spread²)."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=generator, device=DEVICE) * 3
    ref_logits = logits + spread * torch.randn(*shape, vocab, generator=generator, device=DEVICE)
    return logits.to(dtype), ref_logits.to(dtype)


def check(logits, ref_logits):
    kl = full_kl(logits, ref_logits)
    ref = reference.full_kl(logits, ref_logits)
    assert kl.dtype == torch.float32 and kl.shape == logits.shape[:-1]
    torch.testing.assert_close(kl, ref, **tol(logits.dtype))
    assert_within_twice_reference_error(kl, ref, full_kl_float64(logits, ref_logits))
    assert (kl >= 0).all()
    return kl


CASES = [  # (leading shape, V)
    ((5,), 7),  # tiny vocabulary
    ((3,), 50257),  # GPT-2's vocabulary
    ((2, 3), 1000),  # [B, T, V], not a power of two
    ((1, 1), 300),  # batch of one, T = 1
    ((2,), 70001),  # more than one interpreter block
]
CASE_IDS = ["V7", "V50257", "3d", "batch1-T1", "V70001"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_matches_reference(dtype, case):
    shape, vocab = case
    check(*make_pair(shape, vocab, dtype))


@pytest.mark.parametrize("spread", [0.0, 1e-3, 0.3, 5.0])
def test_zero_for_identical_rows_and_never_negative(spread):
    logits, ref_logits = make_pair((6,), 500, torch.float32, spread=spread, seed=1)
    kl = check(logits, ref_logits)
    if spread == 0.0:
        assert (kl == 0).all()  # exactly: every accumulated difference is 0 and both sums match
    assert (full_kl(logits, logits.clone()) == 0).all()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 300), spread=st.floats(0.0, 3.0),
       dtype=st.sampled_from(FLOAT_DTYPES), block=st.sampled_from([16, 64, 65536]), seed=st.integers(0, 2**16))
def test_random_shapes(rows, vocab, spread, dtype, block, seed):
    """Any V against any block size (V < block, = k·block, k·block + r)."""
    saved = launch.INTERPRETER_MAX_VOCAB_BLOCK, launch.GPU_MAX_VOCAB_BLOCK
    launch.INTERPRETER_MAX_VOCAB_BLOCK = launch.GPU_MAX_VOCAB_BLOCK = block  # not monkeypatch: per example
    try:
        check(*make_pair((rows,), vocab, dtype, spread=spread, seed=seed))
    finally:
        launch.INTERPRETER_MAX_VOCAB_BLOCK, launch.GPU_MAX_VOCAB_BLOCK = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_online_rescaling_across_blocks(small_blocks, dtype):
    """Row maxima growing through the row for one input and shrinking for the other: 16 blocks of 64."""
    logits, ref_logits = make_pair((4,), 1000, torch.float32, spread=0.5, seed=2)
    ramp = torch.linspace(-8.0, 8.0, 1000, device=DEVICE)
    check((logits + ramp).to(dtype), (ref_logits - ramp).to(dtype))
    check((logits - ramp).to(dtype), (ref_logits + ramp).to(dtype))


def test_minus_inf_logits(small_blocks):
    """p = 0 where logits are −inf (whole leading blocks too): those terms vanish; q = 0 under p > 0 is +inf."""
    logits, ref_logits = make_pair((3,), 300, torch.float32, spread=0.5, seed=3)
    logits[0, :200] = float("-inf")
    ref_logits[1, :130] = float("-inf")
    logits[1, :130] = float("-inf")  # both −inf: no mass, no term
    kl = full_kl(logits, ref_logits)
    torch.testing.assert_close(kl.double(), full_kl_float64(logits, ref_logits), **tol(torch.float32))
    ref_logits[2, 5] = float("-inf")
    assert full_kl(logits, ref_logits)[2] == float("inf")


def test_mixed_dtypes_and_strides_read_in_place():
    """A bf16 policy view `logits[:, :-1]` against a float32 reference with another layout: no copies."""
    base, _ = make_pair((2, 7), 300, torch.bfloat16)
    logits = base[:, :-1]
    ref_base = torch.randn(7, 2, 300, device=DEVICE)
    ref_logits = ref_base.transpose(0, 1)[:, 1:]  # [2, 6, 300], strides (300, 600, 1)
    assert not logits.is_contiguous() and not ref_logits.is_contiguous()
    with LargeAllocations(logits.numel() // 2) as recorder:
        kl = full_kl(logits, ref_logits)
    assert not recorder.found, recorder.found
    torch.testing.assert_close(kl, full_kl(logits.contiguous(), ref_logits.contiguous()), **tol(torch.float32))
    torch.testing.assert_close(kl.double(), full_kl_float64(logits, ref_logits), **tol(torch.float32))


def test_ops_dispatches_to_this_kernel(monkeypatch):
    calls = []
    import fastppo.kernels.full_kl as module

    def spy(*args):
        calls.append(args)
        return full_kl(*args)

    monkeypatch.setattr(module, "full_kl", spy)
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits, ref_logits = make_pair((2, 3), 40, torch.float32)
    kl = ops.full_kl(logits, ref_logits, backend="triton")
    assert len(calls) == 1
    torch.testing.assert_close(kl, reference.full_kl(logits, ref_logits), **tol(torch.float32))


def test_bad_arguments_raise():
    logits, ref_logits = make_pair((2,), 5, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        full_kl(logits, ref_logits[:1])
    with pytest.raises(ValueError, match="V ≥ 1"):
        full_kl(logits[:, :0], ref_logits[:, :0])
    assert full_kl(logits[:0], ref_logits[:0]).shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_gpu_real_shape():
    """N=8192, V=128256 bf16 (the benchmark shape), and a view of it read without a copy."""
    n, vocab = 8192, 128256
    logits, ref_logits = make_pair((n,), vocab, torch.bfloat16, spread=0.3)
    check(logits[:128], ref_logits[:128])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kl = full_kl(logits.view(8, 1024, vocab)[:, :-1], ref_logits.view(8, 1024, vocab)[:, 1:])
    assert torch.cuda.max_memory_allocated() - before < 64 * 2**20
    ref = torch.cat([reference.full_kl(logits.view(8, 1024, vocab)[i, :-1], ref_logits.view(8, 1024, vocab)[i, 1:])
                     for i in range(8)])
    torch.testing.assert_close(kl.reshape(-1), ref, **tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_gpu_offsets_past_2_pow_31():
    n, vocab = 16384, 151936  # 2.5e9 elements per input
    logits = torch.randn(n, vocab, device=DEVICE, dtype=torch.bfloat16)
    ref_logits = logits + 0.3 * torch.randn(n, vocab, device=DEVICE, dtype=torch.bfloat16)
    kl = full_kl(logits, ref_logits)
    tail = slice(n - 64, n)
    torch.testing.assert_close(kl[tail], reference.full_kl(logits[tail], ref_logits[tail]), **tol(torch.bfloat16))
