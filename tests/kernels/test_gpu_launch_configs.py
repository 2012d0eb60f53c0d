"""Every kernel with the launch configuration a GPU gets, run under the interpreter.

Without a GPU the interpreter normally picks its own blocks (a whole vocabulary row, one row
per program), so the GPU heuristics of kernels/_launch.py — 2048-column vocabulary blocks
with a masked tail, 2048-element token tiles holding several rows per program, padding rows
— would never execute before a GPU run. Here `is_interpreted` answers False, `vocab_block`
and `token_tiles` return what a GPU would get (num_warps means nothing to the interpreter),
and each op is checked against the reference, forward and backward. On a GPU the other
kernel tests run these configurations for real.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (see kernel_utils)
pytest.importorskip("triton")

from fastppo import ops, reference  # noqa: E402
from fastppo.kernels import _launch  # noqa: E402
from kernel_utils import ON_GPU, kernels_can_run  # noqa: E402,F401 (kernels_can_run: autouse fixture)
from tolerances import tol  # noqa: E402

pytestmark = [
    pytest.mark.skipif(ON_GPU, reason="a GPU runs these configurations in the other kernel tests"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]
VOCAB = 5000  # two full 2048-column blocks and a masked tail of 904
ROWS_SHAPES = [(3, 100), (2, 2500)]  # 4 rows × 128 per tile (one row of padding); 1 × 2048 with a tail


@pytest.fixture(autouse=True)
def gpu_launch_configs(monkeypatch):
    monkeypatch.setattr(_launch, "is_interpreted", lambda device: False)
    assert _launch.vocab_block(VOCAB, torch.device("cpu")) == (2048, 4)
    assert _launch.token_tiles(3, 100, torch.device("cpu"))[:2] == (4, 128)
    assert _launch.token_tiles(2, 2500, torch.device("cpu"))[:2] == (1, 2048)


def logits_pair(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, VOCAB, generator=generator).bfloat16()
    labels = torch.randint(0, VOCAB, (2, 3), generator=generator)
    return logits, labels


def token_inputs(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = [0.3 * torch.randn(shape, generator=generator) for _ in range(6)]
    mask = torch.rand(shape, generator=generator) < 0.8
    mask[:, 0] = True
    return tensors, mask


def test_logprobs_forward_and_backward():
    logits, labels = logits_pair(0)
    g_logp, g_entropy = torch.randn(2, 3), torch.randn(2, 3)
    results = []
    for backend in ("triton", "torch"):
        leaf = logits.clone().requires_grad_()
        logp, entropy = ops.logprobs_from_logits(leaf, labels, temperature=0.8, return_entropy=True,
                                                 backend=backend)
        (grad,) = torch.autograd.grad((logp, entropy), leaf, (g_logp, g_entropy))
        results.append((logp, entropy, grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **tol(got.dtype))


def test_full_kl():
    logits, _ = logits_pair(1)
    ref_logits, _ = logits_pair(2)
    got = ops.full_kl(logits, ref_logits, backend="triton")
    torch.testing.assert_close(got, reference.full_kl(logits, ref_logits), **tol(torch.bfloat16))


@pytest.mark.parametrize("shape", ROWS_SHAPES, ids=str)
def test_kl_rewards_gae_and_whitening(shape):
    (logprobs, ref_logprobs, values, _, _, _), mask = token_inputs(shape, 3)
    scores = torch.randn(shape[0])
    for estimator in ("kl", "k3"):
        got = ops.kl_penalty_rewards(logprobs, ref_logprobs, mask, scores, 0.2, estimator, backend="triton")
        expected = reference.kl_penalty_rewards(logprobs, ref_logprobs, mask, scores, 0.2, estimator)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **tol(torch.float32))
    rewards = got[0]
    for g, e in zip(ops.gae(rewards, values, mask, 0.99, 0.95, backend="triton"),
                    reference.gae(rewards, values, mask, 0.99, 0.95)):
        torch.testing.assert_close(g, e, **tol(torch.float32))
    torch.testing.assert_close(ops.masked_whiten(values, mask, backend="triton"),
                               reference.masked_whiten(values, mask), **tol(torch.float32))


@pytest.mark.parametrize("shape", ROWS_SHAPES, ids=str)
def test_ppo_loss_forward_and_backward(shape):
    tensors, mask = token_inputs(shape, 4)
    results = []
    for backend in ("triton", "torch"):
        logprobs, values = tensors[0].clone().requires_grad_(), tensors[2].clone().requires_grad_()
        out = ops.ppo_loss(logprobs, tensors[1], values, *tensors[3:], mask, 0.2, 0.2, 0.1, backend=backend)
        grads = torch.autograd.grad(out.loss, (logprobs, values))
        results.append((*out, *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **tol(torch.float32))


def test_linear_logprobs_forward_and_backward():
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 16, generator=generator).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(VOCAB, 16, generator=generator)).bfloat16().requires_grad_()
    labels = torch.randint(0, VOCAB, (40,), generator=generator)
    g = torch.randn(40)
    results = []
    for backend in ("triton", "torch"):
        logp = ops.linear_logprobs(hidden, weight, labels, backend=backend, chunk_size=16)
        results.append((logp, *torch.autograd.grad(logp, (hidden, weight), g)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **tol(got.dtype))


@pytest.mark.parametrize("vocab", [9001, 9216], ids=["ragged-V9001", "aligned-V9216"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "in-place"])
def test_vocabulary_rows_at_every_16_byte_phase(inplace, vocab):
    """[2, 4, V] read through `[:, :-1]`. V = 9001: rows start at every phase of a 16-byte group, so
    the masked first block holds 0–7 lanes before the row, then unmasked 2048-column blocks,
    then a masked tail; a new gradient buffer has another row layout than the logits (another
    phase), the in-place one the same. V = 9216 (a multiple of 16): the single masked loop."""
    layout = _launch.row_layout(torch.empty(2, 4, vocab).bfloat16()[:, :-1])
    assert _launch.aligned_block(2048, vocab, torch.empty(1).bfloat16(), layout)["RAGGED"] == (vocab % 16 != 0)
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(2, 4, vocab, generator=generator).bfloat16()
    ref_base = torch.randn(2, 4, vocab, generator=generator).bfloat16()
    labels = torch.randint(0, vocab, (2, 3), generator=generator)
    g_logp, g_entropy = torch.randn(2, 3, generator=generator), torch.randn(2, 3, generator=generator)
    results = []
    for backend in ("triton", "torch"):
        leaf = base.clone().requires_grad_()
        logits = leaf[:, :-1]
        logp, entropy = ops.logprobs_from_logits(logits, labels, return_entropy=True, backend=backend,
                                                 inplace_backward=inplace)
        (grad,) = torch.autograd.grad((logp, entropy), logits, (g_logp, g_entropy))
        kl = ops.full_kl(base[:, :-1], ref_base[:, 1:], backend=backend)  # two layouts, one phase each
        results.append((logp, entropy, grad, kl))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **tol(got.dtype))
