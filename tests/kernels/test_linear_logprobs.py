"""ops.linear_logprobs: the chunked reference and the Triton path against full-logits math; no [N, V] allocation."""

import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (see kernel_utils)
pytest.importorskip("triton")

import fastppo.kernels._launch as launch  # noqa: E402
from fastppo import ops  # noqa: E402
from kernel_utils import (  # noqa: E402
    DEVICE,
    ON_GPU,
    LargeAllocations,
    PeakLiveBytes,
    assert_within_twice_reference_error,
    interpreter_unusable,
)
from tolerances import tol  # noqa: E402

# The interpreter evaluates both branches of tl.where on padding lanes (0·−inf) in numpy.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _kernels_can_run(monkeypatch):
    reason = interpreter_unusable()
    if reason is not None:
        pytest.fail(reason)
    # 64-column vocabulary blocks: every V > 64 below runs the epilogue's multi-block online path
    monkeypatch.setattr(launch, "INTERPRETER_MAX_VOCAB_BLOCK", 64)


def make_inputs(shape, n_hidden, vocab, dtype, bias=True, seed=0):
    """hidden [*shape, H], weight [V, H], bias [V] or None (all leaves requiring grad), labels [*shape]."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    hidden = torch.randn(*shape, n_hidden, generator=generator, device=DEVICE)
    weight = torch.randn(vocab, n_hidden, generator=generator, device=DEVICE) * (3 / math.sqrt(n_hidden))
    bias_ = torch.randn(vocab, generator=generator, device=DEVICE) if bias else None
    labels = torch.randint(0, vocab, shape, generator=generator, device=DEVICE)
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias_)]
    return (*leaves, labels)


def upstream(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DEVICE)


def full_logits_math(hidden, weight, bias, labels, temperature):
    """The unchunked statement: F.log_softmax(lm_head(hidden).float() / T) gathered, and −Σ p log p."""
    logp_all = F.log_softmax(F.linear(hidden, weight, bias).float() / temperature, dim=-1)
    picked = logp_all.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked, -(logp_all.exp() * logp_all).sum(-1)


def run(fn, hidden, weight, bias, labels, temperature, seed=1):
    """(logp, entropy, grads of hidden/weight/bias) under non-unit upstream gradients on both outputs."""
    logp, entropy = fn(hidden, weight, bias, labels, temperature)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((logp, entropy), leaves, (upstream(logp.shape, seed), upstream(logp.shape, seed + 1)))
    return logp, entropy, grads


def op(backend, chunk_size=None):
    def call(hidden, weight, bias, labels, temperature):
        return ops.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True,
                                   backend=backend, chunk_size=chunk_size)
    return call


CASES = [  # (leading shape, H, V, chunk_size, bias, temperature)
    ((13,), 24, 37, 4, True, 1.0),  # N not a multiple of the chunk; V odd, below one block
    ((1,), 16, 50, None, False, 0.7),  # N = 1, default chunk, no bias, T ≠ 1
    ((2, 5), 16, 300, 3, True, 1.3),  # [B, T, H]; V = 300 spans five 64-column blocks
    ((9,), 8, 129, 9, False, 2.0),  # exactly one chunk; V = 2^7 + 1
]
CASE_IDS = ["N13-chunk4", "N1-default", "3d-V300", "one-chunk-V129"]


@pytest.mark.parametrize("split", ["tokens", "vocab"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_full_logits_math(dtype, case, backend, split, monkeypatch):
    """Forward (logp, entropy) and gradients of hidden, weight and bias against the unchunked math,
    with the backward walking token chunks or vocabulary tiles."""
    monkeypatch.setattr(launch, "LINEAR_BACKWARD_SPLIT", split)
    shape, n_hidden, vocab, chunk_size, bias, temperature = case
    hidden, weight, bias_, labels = make_inputs(shape, n_hidden, vocab, dtype, bias)
    logp, entropy, grads = run(op(backend, chunk_size), hidden, weight, bias_, labels, temperature)
    ref_logp, ref_entropy, ref_grads = run(full_logits_math, hidden, weight, bias_, labels, temperature)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == entropy.shape == labels.shape
    assert (logp <= 0).all()
    torch.testing.assert_close(logp, ref_logp, **tol(dtype))
    torch.testing.assert_close(entropy, ref_entropy, **tol(dtype))
    for grad, ref_grad, leaf in zip(grads, ref_grads, [t for t in (hidden, weight, bias_) if t is not None]):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        torch.testing.assert_close(grad, ref_grad, **tol(dtype))
    if dtype == torch.float32:  # flash-attention's bar against float64 math: ≤ 2× the eager float32 error
        exact = run(full_logits_math, *(t.double() if t is not None else None for t in (hidden, weight, bias_)),
                    labels, temperature)
        for value, ref_value, exact_value in zip((logp, entropy, *grads), (ref_logp, ref_entropy, *ref_grads),
                                                 (exact[0], exact[1], *exact[2])):
            assert_within_twice_reference_error(value, ref_value, exact_value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_path_matches_reference(dtype):
    """The two backends compute the same chunk logits; only the epilogue differs."""
    hidden, weight, bias, labels = make_inputs((3, 7), 12, 200, dtype, seed=4)
    outs = [run(op(backend, 5), hidden, weight, bias, labels, 0.8, seed=6) for backend in BACKENDS]
    (logp, entropy, grads), (ref_logp, ref_entropy, ref_grads) = outs
    torch.testing.assert_close(logp, ref_logp, **tol(torch.float32))
    torch.testing.assert_close(entropy, ref_entropy, **tol(torch.float32))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_gradients_and_unused_outputs(backend):
    """Frozen weight (hidden-only gradient), logp without entropy, entropy alone, and no-grad rollout."""
    hidden, weight, bias, labels = make_inputs((10,), 8, 70, torch.float32, seed=2)
    weight, bias = weight.detach(), bias.detach()
    g = upstream(10, 3)
    for output in (0, 1):
        out = ops.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=backend,
                                  chunk_size=4)[output]
        (grad,) = torch.autograd.grad(out, hidden, g)
        (ref_grad,) = torch.autograd.grad(full_logits_math(hidden, weight, bias, labels, 1.0)[output], hidden, g)
        torch.testing.assert_close(grad, ref_grad, **tol(torch.float32))
    logp = ops.linear_logprobs(hidden, weight, labels, backend=backend, chunk_size=3)
    (grad,) = torch.autograd.grad(logp, hidden, g)
    (ref_grad,) = torch.autograd.grad(full_logits_math(hidden, weight, None, labels, 1.0)[0], hidden, g)
    torch.testing.assert_close(grad, ref_grad, **tol(torch.float32))
    with torch.no_grad():
        logp = ops.linear_logprobs(hidden, weight, labels, bias=bias, backend=backend)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, full_logits_math(hidden, weight, bias, labels, 1.0)[0], **tol(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_hidden_view(backend):
    """`hidden[:, :-1]` with `ids[:, 1:]`, as the trainer passes them."""
    base, weight, bias, ids = make_inputs((2, 6), 8, 40, torch.float32, seed=5)
    hidden, labels = base[:, :-1], ids[:, 1:]
    assert not hidden.is_contiguous()
    logp, entropy, grads = run(op(backend, 4), hidden, weight, bias, labels, 1.0)
    ref_logp, ref_entropy, ref_grads = run(full_logits_math, hidden, weight, bias, labels, 1.0)
    torch.testing.assert_close(logp, ref_logp, **tol(torch.float32))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **tol(torch.float32))


# --------------------------------------------------------------------------- tiles and memory


@pytest.mark.parametrize("n_tokens, vocab, chunk", [(32768, 128256, 1024), (13, 37, 4), (300, 200, 64),
                                                    (64, 96, 8), (5, 1000, 8), (1, 7, 1)])
def test_backward_tiles_cover_the_logits_once_within_the_chunk_budget(n_tokens, vocab, chunk):
    split, tiles = launch.linear_logprobs_backward_tiles(n_tokens, vocab, chunk)
    # a partition of one axis, each tile spanning the whole other axis: every logit exactly once
    walked, whole = (0, 1) if split == "tokens" else (1, 0)
    sizes = (n_tokens, vocab)
    edges = [0]
    for tile in tiles:
        assert tile[whole] == slice(0, sizes[whole]) and tile[walked].start == edges[-1] < tile[walked].stop
        edges.append(tile[walked].stop)
        # about one forward chunk of logits: ≤ chunk·V, the vocab tile's rounding only ever shrinks it
        assert (tile[0].stop - tile[0].start) * (tile[1].stop - tile[1].start) <= chunk * vocab
    assert edges[-1] == sizes[walked]
    # the float32 accumulator is the smaller of grad_hidden [N, H] and grad_weight [V, H]
    assert split == ("vocab" if chunk < n_tokens <= vocab else "tokens")
    if split == "vocab" and chunk * vocab // n_tokens >= launch.LINEAR_VOCAB_TILE_MULTIPLE:
        assert all((cols.stop - cols.start) % launch.LINEAR_VOCAB_TILE_MULTIPLE == 0 for _, cols in tiles[:-1])
    if (n_tokens, vocab) == (32768, 128256):  # DESIGN §6's shape: 33 tiles of 3968 columns, 260 MB in bf16
        assert len(tiles) == 33 and tiles[0][1] == slice(0, 3968)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peak_memory_is_one_tile_and_the_smaller_accumulator(backend):
    """bf16, N < V: fwd+bwd peak live bytes beyond the gradients themselves stay within one tile of
    logits (plus, for the reference, its float32 temporaries of a tile) and a float32 [N, H]
    accumulator with its product — below the float32 [V, H] a token-chunked backward would sum into."""
    n_tokens, n_hidden, vocab, chunk = 32, 64, 512, 4  # vocabulary tiles of 64 columns, 8 of them
    hidden, weight, bias, labels = make_inputs((n_tokens,), n_hidden, vocab, torch.bfloat16, seed=10)
    g_logp, g_entropy = upstream(n_tokens, 11), upstream(n_tokens, 12)
    with PeakLiveBytes() as memory:
        logp, entropy = ops.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                            backend=backend, chunk_size=chunk)
        grads = torch.autograd.grad((logp, entropy), (hidden, weight, bias), (g_logp, g_entropy))
    gradients = sum(grad.numel() * grad.element_size() for grad in grads)
    tile_logits = chunk * vocab  # elements: the forward chunk and each backward tile hold this many
    per_tile = 2 if backend == "triton" else 2 + 7 * 4  # bf16 buffer; the reference's float32 temporaries
    accumulator = n_tokens * n_hidden * (4 + 2)  # float32 grad_hidden and one bf16 product
    per_token = 64  # logp, entropy, row statistics, upstream grads, shifted labels: a few words per token
    bound = tile_logits * per_tile + accumulator + n_tokens * per_token
    assert memory.peak - gradients <= bound, (memory.peak, gradients, bound)
    assert memory.peak - gradients < vocab * n_hidden * 4  # a float32 [V, H]
    with PeakLiveBytes() as unchunked:  # the same recorder sees the eager path's [N, V] logits
        run(full_logits_math, hidden, weight, bias, labels, 1.0)
    assert unchunked.peak > n_tokens * vocab * 4




def largest_numel(recorder: LargeAllocations) -> int:
    return max((math.prod(shape) for _, shape in recorder.found), default=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_allocates_n_by_v(backend):
    """No tensor of ≥ N·V elements, forward or backward; the largest is a chunk or the [V, H] gradient."""
    n_tokens, n_hidden, vocab, chunk = 64, 16, 96, 8  # N·V = 6144 ≫ chunk·V = 768; V·H = 1536
    hidden, weight, bias, labels = make_inputs((n_tokens,), n_hidden, vocab, torch.bfloat16, seed=7)
    g_logp, g_entropy = upstream(n_tokens, 8), upstream(n_tokens, 9)
    with LargeAllocations(1) as forward:
        logp, entropy = ops.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                            backend=backend, chunk_size=chunk)
    with LargeAllocations(1) as backward:
        torch.autograd.grad((logp, entropy), (hidden, weight, bias), (g_logp, g_entropy))
    bound = max(chunk * vocab, vocab * n_hidden)
    for recorder in (forward, backward):
        largest = largest_numel(recorder)
        # the recorder saw the chunk logits (so it watched this pass), and nothing near N·V
        assert chunk * vocab <= largest <= bound < n_tokens * vocab, (largest, recorder.found)
    with LargeAllocations(n_tokens * vocab) as unchunked:  # the same recorder catches the eager path
        run(full_logits_math, hidden, weight, bias, labels, 1.0)
    assert unchunked.found


# --------------------------------------------------------------------------- chunk heuristic, dispatch, errors


def test_default_chunk_size():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert launch.linear_logprobs_chunk_size(32768, 128256, cuda) == 1024  # 256 MB of bf16 logits
    for vocab in (512, 32000, 128256, 151936, 10**6):
        chunk = launch.linear_logprobs_chunk_size(10**6, vocab, cuda)
        assert chunk % launch.LINEAR_CHUNK_MULTIPLE == 0
        assert launch.LINEAR_CHUNK_MIN_TOKENS <= chunk <= launch.LINEAR_CHUNK_MAX_TOKENS
        assert chunk * vocab <= max(launch.LINEAR_CHUNK_LOGITS_GPU, launch.LINEAR_CHUNK_MIN_TOKENS * vocab)
        assert launch.linear_logprobs_chunk_size(10**6, vocab, cpu) <= chunk
    assert launch.linear_logprobs_chunk_size(5, 50257, cpu) == 5  # never more than the tokens
    assert launch.linear_logprobs_chunk_size(0, 50257, cpu) == 1


def test_chunk_heuristic_imports_without_triton(monkeypatch):
    """The reference takes its default chunk from kernels/_launch.py, so that module must import without triton."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    spec = importlib.util.spec_from_file_location("_launch_without_triton", launch.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    assert module.linear_logprobs_chunk_size(4096, 50257, DEVICE) == launch.linear_logprobs_chunk_size(
        4096, 50257, DEVICE)


def test_ops_dispatches_to_the_kernel(monkeypatch):
    import fastppo.kernels.linear_logprobs as module

    calls = []
    kernel = module.linear_logprobs

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, "linear_logprobs", spy)
    hidden, weight, _, labels = make_inputs((4,), 8, 20, torch.float32)
    ops.linear_logprobs(hidden, weight, labels, backend="triton", chunk_size=2)
    assert calls == [dict(bias=None, temperature=1.0, return_entropy=False, chunk_size=2)]
    ops.linear_logprobs(hidden, weight, labels, backend="torch")
    assert len(calls) == 1


def test_bad_arguments_raise():
    hidden, weight, bias, labels = make_inputs((4,), 8, 20, torch.float32)
    cases = [
        (TypeError, "hidden", dict(hidden=hidden.detach().cpu().numpy())),
        (TypeError, "hidden", dict(hidden=hidden.long())),
        (TypeError, "weight", dict(weight=weight.to(torch.float64))),
        (ValueError, "weight", dict(weight=weight[:, :5])),
        (ValueError, "weight", dict(weight=weight[:0])),
        (ValueError, "weight", dict(weight=weight[None])),
        (TypeError, "labels", dict(labels=labels.float())),
        (ValueError, "labels", dict(labels=labels[:3])),
        (ValueError, "bias", dict(bias=bias[:5])),
        (TypeError, "bias", dict(bias=bias.to(torch.float64))),
        (ValueError, "temperature", dict(temperature=0.0)),
        (ValueError, "chunk_size", dict(chunk_size=0)),
        (TypeError, "chunk_size", dict(chunk_size=2.5)),
        (ValueError, "backend", dict(backend="cuda")),
    ]
    args = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
    for error, name, change in cases:
        with pytest.raises(error, match=name):
            ops.linear_logprobs(**{**args, **change})
    for backend in BACKENDS:  # no tokens: empty results, no launch
        empty = ops.linear_logprobs(hidden[:0], weight, labels[:0], backend=backend)
        assert empty.shape == (0,) and empty.dtype == torch.float32


# --------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_matches_full_logits_math(backend):
    hidden, weight, bias, labels = make_inputs((2048,), 1024, 128256, torch.bfloat16)
    logp, entropy, grads = run(op(backend), hidden, weight, None, labels, 0.9)
    ref_logp, ref_entropy, ref_grads = run(full_logits_math, hidden, weight, None, labels, 0.9)
    torch.testing.assert_close(logp, ref_logp, **tol(torch.bfloat16))
    torch.testing.assert_close(entropy, ref_entropy, **tol(torch.bfloat16))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_memory_stays_chunk_sized(backend):
    """N = 16384, V = 128256: the bf16 logits alone would be 4.2 GB; fwd+bwd peak extra stays ~1 GB."""
    n_tokens, n_hidden, vocab = 16384, 1024, 128256
    hidden, weight, bias, labels = make_inputs((n_tokens,), n_hidden, vocab, torch.bfloat16)
    g_logp, g_entropy = upstream(n_tokens, 1), upstream(n_tokens, 2)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logp, entropy = ops.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=backend)
    grads = torch.autograd.grad((logp, entropy), (hidden, weight, bias), (g_logp, g_entropy))
    peak_extra = torch.cuda.max_memory_allocated() - before
    # Triton: one bf16 tile of ~1024·V logits, the float32 [N, H] accumulator and its product, the bf16
    # gradients; the reference adds a few float32 tile temporaries. Unchunked: bf16 logits + their
    # float32 upcast, and more.
    bound = n_tokens * vocab * (2 if backend == "triton" else 4) // 2
    assert peak_extra < bound, f"peak extra {peak_extra / 2**30:.2f} GiB ≥ {bound / 2**30:.2f} GiB"
    subset = slice(0, 512)  # values against the unchunked math on a slice of the tokens
    ref_logp, ref_entropy = full_logits_math(hidden[subset], weight, bias, labels[subset], 1.0)
    torch.testing.assert_close(logp[subset], ref_logp, **tol(torch.bfloat16))
    torch.testing.assert_close(entropy[subset], ref_entropy, **tol(torch.bfloat16))
    assert all(torch.isfinite(grad).all() for grad in grads)
