"""fastppo.models.varlen_attention: a packed row through the installed implementation equals each sequence
alone (logits, gradients, gradient checkpointing), builds no dense mask and reads nothing back; every
other forward (padded, generate) is transformers' SDPA exactly."""

import copy
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastppo.models import varlen_attention as va

if not va.AVAILABLE:  # transformers 4.46 (scripts/test_oldest.sh): nothing is registered, install() switches nothing
    pytest.skip(f"no varlen attention: {va.UNAVAILABLE}", allow_module_level=True)

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, masking_utils  # noqa: E402

from fastppo import AutoModelForCausalLMWithValueHead  # noqa: E402
from fastppo.host_reads import HostReads  # noqa: E402

LENGTHS = [5, 3, 7]  # N = 15: no other tensor in these models has two trailing dims of 15
CLOSE = dict(atol=1e-5, rtol=1e-5)


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, attn_pdrop=0.0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0))


def _llama():  # grouped-query attention: 4 query heads share 2 key/value heads
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=1, pad_token_id=0))


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    torch.manual_seed(0)
    return {"gpt2": _gpt2, "llama": _llama}[request.param]().eval()


def _sequences(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (1, n), generator=generator) for n in LENGTHS]


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _apart(model, sequences, weights):
    """Logits of each sequence alone, concatenated, and the gradients of sum(logits * weights)."""
    model.zero_grad()
    logits = torch.cat([model(input_ids=ids, use_cache=False).logits for ids in sequences], dim=1)
    (logits * weights).sum().backward()
    return logits.detach(), _grads(model)


def _packed(model, sequences, weights):
    model.zero_grad()
    logits = model(input_ids=torch.cat(sequences, dim=1), use_cache=False, **va.packed_kwargs(LENGTHS, "cpu")).logits
    (logits * weights).sum().backward()
    return logits.detach(), _grads(model)


def _assert_same(got, expected):
    (logits, grads), (want_logits, want_grads) = got, expected
    torch.testing.assert_close(logits, want_logits, **CLOSE)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], msg=lambda m, name=name: f"{name}: {m}", **CLOSE)


def test_choose_kernel_on_cpu():
    assert va.choose_kernel("cpu") == va.choose_kernel(torch.device("cpu")) == "sdpa_per_sequence"


def test_packed_equals_apart(model):
    assert va.install(model) == "sdpa_per_sequence" and model.config._attn_implementation == va.NAME
    sequences = _sequences()
    weights = torch.randn(1, sum(LENGTHS), model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    _assert_same(_packed(model, sequences, weights), _apart(model, sequences, weights))


def test_gradient_checkpointing_recomputes_the_varlen_path(model, monkeypatch):
    va.install(model)
    sequences = _sequences(seed=2)
    weights = torch.randn(1, sum(LENGTHS), model.config.vocab_size, generator=torch.Generator().manual_seed(3))
    expected = _apart(model, sequences, weights)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # dropout is 0: training mode changes nothing but turns checkpointing on
    calls = []
    per_sequence = va._per_sequence
    monkeypatch.setattr(va, "_per_sequence", lambda *args: calls.append(1) or per_sequence(*args))
    got = _packed(model, sequences, weights)
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers  # each layer's forward, then its recomputation in backward: both varlen
    _assert_same(got, expected)


class _SquareMasks(TorchDispatchMode):
    """Records every op output whose two trailing dims are both `n`: an [*, *, N, N] mask or score matrix."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.ndim >= 2 and leaf.shape[-2:] == (self.n, self.n):
                self.seen.append((str(func), tuple(leaf.shape)))
        return out


def _watched_packed_call(model, monkeypatch, **call):
    """One packed forward under the watchers: (host reads, [N, N] tensors, transformers mask calls)."""
    mask_calls = []
    find = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda *a: mask_calls.append("find_packed_sequence_indices") or find(*a))
    mapping = masking_utils.AttentionMaskInterface._global_mapping
    for name in ("sdpa", va.NAME):
        monkeypatch.setitem(mapping, name, lambda *a, _f=mapping[name], **k: mask_calls.append("mask") or _f(*a, **k))
    ids = torch.cat(_sequences(), dim=1)
    squares = _SquareMasks(ids.shape[1])
    with torch.no_grad(), squares, HostReads() as reads:
        model(input_ids=ids, use_cache=False, **call)
    return reads, squares.seen, mask_calls


def test_packed_call_builds_no_mask_and_reads_nothing(model, monkeypatch):
    # what transformers does on sdpa with restarting position ids: a dense mask, and a host read to find it
    call = va.packed_kwargs(LENGTHS, "cpu")
    reads, squares, mask_calls = _watched_packed_call(model, monkeypatch, attention_mask=None,
                                                      position_ids=call["position_ids"])
    assert reads.total > 0 and squares and mask_calls == ["find_packed_sequence_indices", "mask"]
    va.install(model)
    reads, squares, mask_calls = _watched_packed_call(model, monkeypatch, **call)
    assert reads.total == 0, reads.report()
    assert squares == [] and mask_calls == []


def test_padded_forward_and_generate_are_sdpa(model):
    reference = copy.deepcopy(model)
    va.install(model)
    ids = torch.randint(2, 64, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as for generation
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True)
    got, want = model.generate(ids, **settings), reference.generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    for score, expected in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(score, expected, rtol=0, atol=0)


def test_the_packed_contract_is_enforced(model):
    va.install(model)
    ids = torch.cat(_sequences(), dim=1)
    call = va.packed_kwargs(LENGTHS, "cpu")
    with pytest.raises(ValueError, match="dense"):  # no marker: transformers would build the [N, N] mask
        model(input_ids=ids, use_cache=False, **{**call, "attention_mask": None})
    with pytest.raises(ValueError, match="without its cu_seq_lens_q"):
        model(input_ids=ids, use_cache=False, attention_mask=call["attention_mask"])
    with pytest.raises(ValueError, match="positive ints"):
        va.packed_kwargs([3, 0], "cpu")


def test_packed_kwargs_layout():
    call = va.packed_kwargs(LENGTHS, "cpu")
    assert call["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]
    assert call["cu_seq_lens_q"].dtype == torch.int32 and call["cu_seq_lens_q"].tolist() == [0, 5, 8, 15]
    assert call["cu_seq_lens_k"] is call["cu_seq_lens_q"] and call["max_length_q"] == call["max_length_k"] == 7
    assert call[va.SEQ_LENS] == (5, 3, 7) and call["attention_mask"].shape == (1, 1, 0, 0)


def test_install_through_the_value_head_and_saving(tmp_path):
    torch.manual_seed(0)
    wrapped = AutoModelForCausalLMWithValueHead(_gpt2())
    assert va.install(wrapped) == "sdpa_per_sequence" and wrapped.causal_lm.config._attn_implementation == va.NAME
    assert va.install(wrapped) == "sdpa_per_sequence"  # installing twice changes nothing
    wrapped.save_pretrained(tmp_path / "wrapped")
    wrapped.causal_lm.save_pretrained(tmp_path / "lm")
    for folder in ("wrapped", "lm"):
        text = (tmp_path / folder / "config.json").read_text()
        assert va.NAME not in text and "attn_implementation" not in json.loads(text)
    eager = _gpt2()
    eager.set_attn_implementation("eager")
    assert va.install(eager) == "transformers:eager" and eager.config._attn_implementation == "eager"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernels run on CUDA")
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_the_cuda_varlen_kernel_equals_each_sequence_alone(build):
    """bf16 on a GPU: flash-attn's or torch's varlen kernel (whichever `choose_kernel` picks) against SDPA on
    each sequence alone, logits and gradients, to bf16 tolerance."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    apart_model = build().to(device, torch.bfloat16).eval()
    packed_model = copy.deepcopy(apart_model)
    assert va.install(packed_model) in ("flash_attn", "torch_varlen")
    sequences = [ids.to(device) for ids in _sequences()]
    weights = torch.randn(1, sum(LENGTHS), 64, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    want, want_grads = _apart(apart_model, sequences, weights)
    packed_model.zero_grad()
    logits = packed_model(input_ids=torch.cat(sequences, dim=1), use_cache=False,
                          **va.packed_kwargs(LENGTHS, device)).logits
    (logits * weights).sum().backward()
    bf16 = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(logits.detach().float(), want.float(), **bf16)
    for name, grad in _grads(packed_model).items():
        scale = want_grads[name].float().abs().max().clamp(min=1e-3)
        torch.testing.assert_close(grad.float() / scale, want_grads[name].float() / scale, **bf16, msg=name)
