"""kernels/logprobs.py against fastppo.reference and a float64 oracle: CPU under the interpreter, or CUDA."""

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
from fastppo.kernels.logprobs import logprobs_from_logits  # noqa: E402
from kernel_utils import kernels_can_run  # noqa: E402,F401 (kernels_can_run: autouse fixture)
from kernel_utils import (  # noqa: E402
    DEVICE,
    FLOAT_DTYPES,
    ON_GPU,
    LargeAllocations,
    assert_within_one_ulp,
    assert_within_twice_reference_error,
    logprobs_float64,
)
from tolerances import tol  # noqa: E402

# The interpreter evaluates both branches of tl.where on padding lanes (0·−inf) in numpy.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")




CASES = [  # (leading shape, V, temperature)
    ((5,), 7, 1.0),  # tiny vocabulary
    ((3,), 50257, 1.0),  # GPT-2's vocabulary, odd
    ((2, 3), 1000, 0.7),  # [B, T, V], V not a power of two, temperature ≠ 1
    ((1, 1), 300, 2.5),  # batch of one, T = 1
    ((2,), 70001, 1.0),  # more than one interpreter block
]
CASE_IDS = ["V7", "V50257", "3d-T0.7", "batch1-T1", "V70001"]


def make_logits(shape, vocab, dtype, scale=3.0, seed=0):
    generator = torch.Generator(DEVICE).manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=generator, device=DEVICE) * scale
    labels = torch.randint(0, vocab, shape, generator=generator, device=DEVICE)
    return logits.to(dtype), labels


def upstream(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DEVICE)


@pytest.fixture()
def small_blocks(monkeypatch):
    """Force 64-column blocks so that small vocabularies exercise the multi-block online path."""
    monkeypatch.setattr(launch, "INTERPRETER_MAX_VOCAB_BLOCK", 64)
    monkeypatch.setattr(launch, "GPU_MAX_VOCAB_BLOCK", 64)


def check_forward(logits, labels, temperature, return_entropy):
    out = logprobs_from_logits(logits, labels, temperature, return_entropy)
    ref = reference.logprobs_from_logits(logits, labels, temperature, return_entropy)
    exact = logprobs_float64(logits, labels, temperature)
    outs, refs = (out, ref) if return_entropy else ((out,), (ref,))
    for kernel_value, ref_value, exact_value in zip(outs, refs, exact):
        assert kernel_value.dtype == torch.float32 and kernel_value.shape == labels.shape
        torch.testing.assert_close(kernel_value, ref_value, **tol(logits.dtype))
        assert_within_twice_reference_error(kernel_value, ref_value, exact_value)
    assert (outs[0] <= 0).all()
    return out


def check_backward(logits, labels, temperature, return_entropy, seed=1):
    """Kernel gradient vs the reference's autograd gradient, both against float64 autograd.

    float32 gradients: the flash-attention bar. Half-precision gradients are float32 values
    rounded once at the store: within one ulp of the exact value (the interpreter's
    float32→bfloat16 cast truncates, a GPU's rounds to nearest).
    """
    g_logp = upstream(labels.shape, seed)
    g_entropy = upstream(labels.shape, seed + 1)
    implementations = (
        (lambda x: logprobs_from_logits(x, labels, temperature, return_entropy=True), logits.dtype),
        (lambda x: reference.logprobs_from_logits(x, labels, temperature, return_entropy=True), logits.dtype),
        (lambda x: logprobs_float64(x, labels, temperature), torch.float64),
    )
    grads = []
    for implementation, dtype in implementations:
        leaf = logits.detach().to(dtype, copy=True).requires_grad_()
        logp, entropy = implementation(leaf)
        loss = (logp * g_logp).sum() + ((entropy * g_entropy).sum() if return_entropy else 0)
        grads.append(torch.autograd.grad(loss, leaf)[0])
    kernel_grad, ref_grad, exact_grad = grads
    assert kernel_grad.dtype == logits.dtype and kernel_grad.shape == logits.shape
    torch.testing.assert_close(kernel_grad, ref_grad, **tol(logits.dtype))
    if logits.dtype == torch.float32:
        assert_within_twice_reference_error(kernel_grad, ref_grad, exact_grad)
    else:
        assert_within_one_ulp(kernel_grad, exact_grad)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("return_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_matches_reference(dtype, case, return_entropy):
    shape, vocab, temperature = case
    logits, labels = make_logits(shape, vocab, dtype)
    check_forward(logits, labels, temperature, return_entropy)


@pytest.mark.parametrize("trend", ["rising", "falling", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_online_rescaling_across_blocks(small_blocks, dtype, trend):
    """Maxima that grow every block (rescale each step), or appear first: 1000 = 15⅝ blocks of 64."""
    logits, labels = make_logits((4,), 1000, torch.float32, scale=1.0, seed=2)
    ramp = torch.linspace(-8.0, 8.0, 1000, device=DEVICE)
    logits = logits + {"rising": ramp, "falling": -ramp, "random": 0 * ramp}[trend]
    logits = logits.to(dtype)
    check_forward(logits, labels, 0.9, return_entropy=True)
    check_backward(logits, labels, 0.9, return_entropy=True)


def test_large_logits_keep_entropy_accurate():
    """H = lse − Σ p·z cancels for large logits; the kernel keeps sums relative to the row max."""
    logits, labels = make_logits((4,), 5000, torch.float32, scale=3.0)
    logits = logits + 40.0
    out, entropy = logprobs_from_logits(logits, labels, 0.7, return_entropy=True)
    exact_logp, exact_entropy = logprobs_float64(logits, labels, 0.7)
    torch.testing.assert_close(entropy.double(), exact_entropy, **tol(torch.float32))
    torch.testing.assert_close(out.double(), exact_logp, **tol(torch.float32))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 3.0])
def test_logprobs_are_never_positive(dtype, temperature):
    """One dominant logit per row, label = argmax: logp → 0 from below, never above."""
    vocab = 129
    logits = torch.zeros(6, vocab, device=DEVICE)
    peak = torch.tensor([1e4 if dtype != torch.float16 else 6e4, 100.0, 30.0, 5.0, 1.0, 0.0], device=DEVICE)
    labels = torch.arange(6, device=DEVICE) * 7
    logits[torch.arange(6), labels] = peak
    logp, entropy = logprobs_from_logits(logits.to(dtype), labels, temperature, return_entropy=True)
    assert (logp <= 0).all() and torch.isfinite(logp).all()
    assert (entropy >= 0).all()
    single = logprobs_from_logits(torch.randn(3, 1, device=DEVICE).to(dtype), torch.zeros(3, dtype=torch.long,
                                                                                           device=DEVICE))
    assert (single == 0).all()  # V = 1: log 1


def test_minus_inf_logits(small_blocks):
    """Masked-out vocabulary (−inf), including whole leading blocks, gives exact log-probs and zero gradient."""
    logits, labels = make_logits((3,), 300, torch.float32, seed=3)
    logits[0, :200] = float("-inf")  # first three blocks entirely −inf
    logits[1, torch.arange(0, 300, 3, device=DEVICE)] = float("-inf")
    labels[0], labels[1] = 250, 1
    leaf = logits.clone().requires_grad_()
    logp, entropy = logprobs_from_logits(leaf, labels, 1.3, return_entropy=True)
    exact_logp, exact_entropy = logprobs_float64(logits, labels, 1.3)
    torch.testing.assert_close(logp.double(), exact_logp, **tol(torch.float32))
    torch.testing.assert_close(entropy.double(), exact_entropy, **tol(torch.float32))
    g_logp, g_entropy = upstream(3, 4), upstream(3, 5)
    (grad,) = torch.autograd.grad((logp * g_logp + entropy * g_entropy).sum(), leaf)
    exact_leaf = logits.double().requires_grad_()
    exact = logprobs_float64(exact_leaf, labels, 1.3)
    (exact_grad,) = torch.autograd.grad((exact[0] * g_logp + exact[1] * g_entropy).sum(), exact_leaf)
    assert torch.isfinite(grad).all() and (grad[torch.isinf(logits)] == 0).all()
    torch.testing.assert_close(grad.double(), exact_grad, **tol(torch.float32))


def test_label_outside_vocabulary_gives_nan():
    logits, _ = make_logits((4,), 11, torch.float32)
    labels = torch.tensor([0, -1, 11, 10], device=DEVICE)
    logp = logprobs_from_logits(logits, labels)
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 300), temperature=st.floats(0.25, 4.0),
       dtype=st.sampled_from(FLOAT_DTYPES), block=st.sampled_from([16, 64, 65536]), seed=st.integers(0, 2**16))
def test_random_shapes(rows, vocab, temperature, dtype, block, seed):
    """Any V against any block size (V < block, = k·block, k·block + r): forward and backward."""
    saved = launch.INTERPRETER_MAX_VOCAB_BLOCK, launch.GPU_MAX_VOCAB_BLOCK
    launch.INTERPRETER_MAX_VOCAB_BLOCK = launch.GPU_MAX_VOCAB_BLOCK = block  # not monkeypatch: per example
    try:
        logits, labels = make_logits((rows,), vocab, dtype, seed=seed)
        check_forward(logits, labels, temperature, return_entropy=True)
        check_backward(logits, labels, temperature, return_entropy=True, seed=seed)
    finally:
        launch.INTERPRETER_MAX_VOCAB_BLOCK, launch.GPU_MAX_VOCAB_BLOCK = saved


# --------------------------------------------------------------------------- layouts


def test_non_contiguous_view_is_read_in_place():
    """`logits[:, :-1]` (and a view needing three stride levels) are read without a copy."""
    base, ids = make_logits((2, 7), 300, torch.bfloat16)
    view, labels = base[:, :-1], ids[:, 1:]
    assert not view.is_contiguous()
    with LargeAllocations(view.numel() // 2) as recorder:
        logp, entropy = logprobs_from_logits(view, labels, 0.8, return_entropy=True)
    assert not recorder.found, recorder.found
    dense_logp, dense_entropy = logprobs_from_logits(view.contiguous(), labels, 0.8, return_entropy=True)
    torch.testing.assert_close(logp, dense_logp, **tol(torch.float32))
    torch.testing.assert_close(entropy, dense_entropy, **tol(torch.float32))

    base4, _ = make_logits((3, 5, 5), 40, torch.float32)
    view4 = base4[:, ::2, :-1]  # strides (25V, 10V, V): three levels, cut along dim 0
    labels4 = torch.randint(0, 40, view4.shape[:-1], device=DEVICE)
    with LargeAllocations(view4.numel() // 2) as recorder:
        logp4 = logprobs_from_logits(view4, labels4)
    assert not recorder.found, recorder.found
    torch.testing.assert_close(logp4, logprobs_from_logits(view4.contiguous(), labels4), **tol(torch.float32))
    check_backward(view4, labels4, 1.0, return_entropy=True)


def test_non_contiguous_labels_and_expanded_upstream_gradient():
    logits, ids = make_logits((2, 6), 50, torch.float32)
    labels = ids.t().contiguous().t()  # column-major labels
    leaf = logits.clone().requires_grad_()
    logp = logprobs_from_logits(leaf, labels)
    torch.testing.assert_close(logp, reference.logprobs_from_logits(logits, labels), **tol(torch.float32))
    (grad,) = torch.autograd.grad(logp.sum(), leaf)  # upstream gradient is expanded (stride 0)
    leaf_ref = logits.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(reference.logprobs_from_logits(leaf_ref, labels).sum(), leaf_ref)
    torch.testing.assert_close(grad, grad_ref, **tol(torch.float32))


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("return_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=[CASE_IDS[0], CASE_IDS[2], CASE_IDS[4]])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_matches_reference(dtype, case, return_entropy):
    shape, vocab, temperature = case
    logits, labels = make_logits(shape, vocab, dtype)
    check_backward(logits, labels, temperature, return_entropy)


def test_tiny_gradient_against_float64_autograd():
    """A hand-sized case: the fp32 kernel's gradient equals float64 autograd to fp32 tolerance."""
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5], [-1.0, 4.0, 4.0, -3.0, 2.0]],
                          device=DEVICE)
    labels = torch.tensor([3, 0, 2], device=DEVICE)
    g_logp = torch.tensor([1.5, -0.5, 2.0], device=DEVICE)
    g_entropy = torch.tensor([-1.0, 0.25, 0.7], device=DEVICE)
    leaf = logits.clone().requires_grad_()
    logp, entropy = logprobs_from_logits(leaf, labels, 0.8, return_entropy=True)
    (grad,) = torch.autograd.grad((logp * g_logp + entropy * g_entropy).sum(), leaf)
    exact_leaf = logits.double().requires_grad_()
    exact_logp, exact_entropy = logprobs_float64(exact_leaf, labels, 0.8)
    (exact,) = torch.autograd.grad((exact_logp * g_logp + exact_entropy * g_entropy).sum(), exact_leaf)
    torch.testing.assert_close(grad.double(), exact, **tol(torch.float32))
    # the formula itself: g·(onehot − p)/T − gH·p·(log p + H)/T
    p = torch.softmax(logits.double() / 0.8, -1)
    onehot = torch.nn.functional.one_hot(labels, 5).double()
    formula = (g_logp[:, None] * (onehot - p)
               - g_entropy[:, None] * p * (p.log() + exact_entropy.detach()[:, None])) / 0.8
    torch.testing.assert_close(exact, formula, **tol(torch.float64))


@pytest.mark.parametrize("used", ["entropy-only", "logp-only"])
def test_backward_with_one_output_unused(used):
    logits, labels = make_logits((3,), 100, torch.float32)
    leaf = logits.clone().requires_grad_()
    logp, entropy = logprobs_from_logits(leaf, labels, 1.5, return_entropy=True)
    g = upstream(3, 7)
    (grad,) = torch.autograd.grad(((entropy if used == "entropy-only" else logp) * g).sum(), leaf)
    leaf_ref = logits.double().requires_grad_()
    out_ref = logprobs_float64(leaf_ref, labels, 1.5)[1 if used == "entropy-only" else 0]
    (grad_ref,) = torch.autograd.grad((out_ref * g).sum(), leaf_ref)
    torch.testing.assert_close(grad.double(), grad_ref, **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_writes_into_the_logits(dtype):
    logits, labels = make_logits((3, 4), 200, dtype)
    g_logp, g_entropy = upstream(labels.shape, 8), upstream(labels.shape, 9)

    leaf = logits.clone().requires_grad_()
    logp, entropy = logprobs_from_logits(leaf, labels, 0.9, return_entropy=True)
    (expected,) = torch.autograd.grad((logp, entropy), leaf, (g_logp, g_entropy))

    leaf = logits.clone().requires_grad_()
    logp, entropy = logprobs_from_logits(leaf, labels, 0.9, return_entropy=True, inplace_backward=True)
    with LargeAllocations(leaf.numel() // 2) as recorder:
        (grad,) = torch.autograd.grad((logp, entropy), leaf, (g_logp, g_entropy), retain_graph=True)
    assert not recorder.found, recorder.found  # no second [N, V] buffer
    assert grad.data_ptr() == leaf.data_ptr()
    assert torch.equal(grad, expected)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(logp.sum(), leaf)  # the logits are gone: a second backward must not read them


def test_inplace_backward_on_a_view_leaves_the_rest_of_the_buffer():
    base, ids = make_logits((2, 5), 64, torch.float32)
    base = base.clone().requires_grad_()
    view, labels = base[:, :-1], ids[:, 1:]
    g = upstream(labels.shape, 10)
    (expected,) = torch.autograd.grad(logprobs_from_logits(view, labels), view, g)
    last = base[:, -1].detach().clone()
    (grad,) = torch.autograd.grad(logprobs_from_logits(view, labels, inplace_backward=True), view, g)
    assert grad.data_ptr() == view.data_ptr() and grad.stride() == view.stride()
    assert torch.equal(grad, expected)
    assert torch.equal(base[:, -1].detach(), last)


# --------------------------------------------------------------------------- dispatch, errors


def test_ops_dispatches_to_this_kernel(monkeypatch):
    calls = []
    import fastppo.kernels.logprobs as module

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return logprobs_from_logits(*args, **kwargs)

    monkeypatch.setattr(module, "logprobs_from_logits", spy)
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    logits, labels = make_logits((2, 3), 30, torch.bfloat16)
    logp, entropy = ops.logprobs_from_logits(logits, labels, temperature=0.5, return_entropy=True, backend="triton")
    assert len(calls) == 1
    ref = reference.logprobs_from_logits(logits, labels, 0.5, True)
    torch.testing.assert_close(logp, ref[0], **tol(torch.bfloat16))
    torch.testing.assert_close(entropy, ref[1], **tol(torch.bfloat16))


def test_bad_arguments_raise():
    logits, labels = make_logits((2,), 5, torch.float32)
    with pytest.raises(ValueError, match="V ≥ 1"):
        logprobs_from_logits(logits[:, :0], labels)
    with pytest.raises(ValueError, match="labels shape"):
        logprobs_from_logits(logits, labels[:1])
    with pytest.raises(TypeError, match="integer"):
        logprobs_from_logits(logits, labels.float())
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, labels, temperature=0.0)
    empty = logprobs_from_logits(logits[:0], labels[:0])
    assert empty.shape == (0,)


# --------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("return_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_gpu_real_shape_forward_backward(return_entropy):
    n, vocab = 4096, 151936
    logits, labels = make_logits((n,), vocab, torch.bfloat16, scale=2.0)
    check_forward(logits[:256], labels[:256], 1.0, return_entropy)
    check_backward(logits[:256], labels[:256], 0.7, return_entropy)
    leaf = logits.clone().requires_grad_()
    out = logprobs_from_logits(leaf, labels, 1.0, return_entropy=return_entropy)
    out = out if return_entropy else (out,)
    ref_leaf = logits.clone().requires_grad_()
    ref = reference.logprobs_from_logits(ref_leaf, labels, 1.0, return_entropy=return_entropy)
    ref = ref if return_entropy else (ref,)
    for value, ref_value in zip(out, ref):
        torch.testing.assert_close(value, ref_value, **tol(torch.bfloat16))
    upstreams = [upstream(labels.shape, seed) for seed in range(len(out))]
    (grad,) = torch.autograd.grad(out, leaf, upstreams)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, upstreams)
    torch.testing.assert_close(grad, ref_grad, **tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_gpu_offsets_past_2_pow_31():
    """N·V > 2³¹ elements (≈5 GB bf16): rows past the int32 range read and write the right memory."""
    n, vocab = 16384, 151936
    assert n * vocab > 2**31
    logits = (torch.randn(n, vocab, device=DEVICE, dtype=torch.bfloat16) * 2).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    logp, entropy = logprobs_from_logits(logits, labels, 1.0, return_entropy=True, inplace_backward=True)
    tail = slice(n - 64, n)  # rows starting beyond element 2**31
    ref_logp, ref_entropy = reference.logprobs_from_logits(logits[tail].detach(), labels[tail], 1.0, True)
    torch.testing.assert_close(logp[tail], ref_logp, **tol(torch.bfloat16))
    torch.testing.assert_close(entropy[tail], ref_entropy, **tol(torch.bfloat16))
    g = torch.randn(n, device=DEVICE)
    leaf = logits[tail].detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference.logprobs_from_logits(leaf, labels[tail]), leaf, g[tail])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (grad,) = torch.autograd.grad(logp, logits, g)
    assert torch.cuda.max_memory_allocated() - before < 256 * 2**20  # in place: no second 5 GB buffer
    torch.testing.assert_close(grad[tail], expected, **tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_gpu_view_is_not_copied():
    base = torch.randn(8, 1025, 151936, device=DEVICE, dtype=torch.bfloat16)
    labels = torch.randint(0, 151936, (8, 1024), device=DEVICE)
    view = base[:, :-1]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logp, entropy = logprobs_from_logits(view, labels, 1.0, return_entropy=True)
    assert torch.cuda.max_memory_allocated() - before < 64 * 2**20
    ref_logp, ref_entropy = reference.logprobs_from_logits(view[:1], labels[:1], 1.0, True)
    torch.testing.assert_close(logp[:1], ref_logp, **tol(torch.bfloat16))
    torch.testing.assert_close(entropy[:1], ref_entropy, **tol(torch.bfloat16))
