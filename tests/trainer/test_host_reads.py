"""The step's host-read budget: at most `BUDGET` reads of device values per `step`, whatever the batch size,
mini-batches, epochs, micro-batches or packing (early stopping off), transformers' own reads included.

Counted on the CPU with `fastppo.host_reads.HostReads` (every one would wait for the device on a GPU); on
CUDA, `torch.cuda.set_sync_debug_mode("warn")` counts the synchronisations themselves.
"""

import warnings

import pytest
import torch

from conftest import dtype_kwarg, make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from fastppo.host_reads import HostReads

# The input check (ids in the vocabulary, finite scores, 0/1 masks), the optimizer steps' guard flags, the stats;
# the running score moments when use_score_scaling is on.
BUDGET = 4
SHAPES = {  # batch, mini-batch, epochs, gradient accumulation
    "B4-mb2-e1": dict(batch_size=4, mini_batch_size=2, ppo_epochs=1),
    "B8-mb2-e2-acc2": dict(batch_size=8, mini_batch_size=2, ppo_epochs=2, gradient_accumulation_steps=2),
}
SWITCHES = {
    "default": {},
    "padding_free": dict(padding_free=True),
    "token_budget": dict(max_tokens_per_microbatch=16),
    "padding_free_token_budget": dict(padding_free=True, max_tokens_per_microbatch=16),
    "full_kl_whiten": dict(kl_penalty="full", whiten_rewards=True),
    "response_logits_packed": dict(response_only_logits=True, padding_free=True, kl_penalty="full"),
    "fused_head": dict(fused_lm_head=True),
    "score_scaling": dict(use_score_scaling=True, use_score_norm=True, score_clip=2.0),
}


def _trainer(model_dir, tokenizer, **config):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    return PPOTrainer(PPOConfig(learning_rate=1e-3, **config), model, ref_model, tokenizer)


def _reads_of_one_step(trainer, tokenizer, batch_size, masks=False, device=None):
    queries, responses, scores = make_batch(tokenizer, batch_size, seed=1, max_response=12)
    response_masks = [torch.ones_like(r) for r in responses] if masks else None
    trainer.step(*make_batch(tokenizer, batch_size, seed=0, max_response=12))  # warm-up
    with HostReads() as reads:
        trainer.step(queries, responses, scores, response_masks=response_masks)
    return reads


@pytest.mark.parametrize("switches", list(SWITCHES))
def test_a_step_reads_the_device_a_constant_few_times(model_dir, tokenizer, switches):
    counts = {}
    for name, shape in SHAPES.items():
        trainer = _trainer(model_dir, tokenizer, **shape, **SWITCHES[switches])
        reads = _reads_of_one_step(trainer, tokenizer, shape["batch_size"])
        assert reads.total <= BUDGET, f"{name}: {reads.report()}"
        counts[name] = reads.total
    assert len(set(counts.values())) == 1, counts  # independent of batch, mini-batches, epochs, accumulation


def test_left_padding_and_response_masks_stay_within_the_budget(gpt2_dir, tokenizer):
    tokenizer.padding_side = "left"
    trainer = _trainer(gpt2_dir, tokenizer, batch_size=4, mini_batch_size=2)
    reads = _reads_of_one_step(trainer, tokenizer, 4, masks=True)
    assert reads.total <= BUDGET, reads.report()


def test_the_counter_counts_what_waits_for_the_device():
    x = torch.arange(6.0)
    with HostReads() as reads:
        x.sum().item()
        bool(x.any())
        x.tolist()
        x[x > 2]  # a boolean-mask index: its size depends on the values
        torch.nonzero(x)
        host = x.cpu()
        host.numpy()  # reading the copy just made is free
        y = x * 2  # no read
        int(y[0])
    assert reads.total == 7, reads.report()
    assert all("test_host_reads.py" in site for site, _ in reads.by_site())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_a_cuda_step_synchronises_within_the_budget(model_dirs, tokenizer):
    """The same budget counted by CUDA itself: every synchronising call warns in sync debug mode."""
    device = torch.device("cuda")
    trainer = _trainer(model_dirs["llama"], tokenizer, batch_size=8, mini_batch_size=2, ppo_epochs=2,
                       padding_free=True)
    queries, responses, scores = make_batch(tokenizer, 8, seed=1, max_response=12)
    trainer.step(*make_batch(tokenizer, 8, seed=0, max_response=12))
    queries, responses, scores = ([t.to(device) for t in queries], [t.to(device) for t in responses],
                                  torch.stack(scores).to(device))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(queries, responses, scores)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= BUDGET, syncs


@pytest.mark.parametrize("name,attention,expected", [
    # transformers' own 4-D masks, built by fastppo (the same tensors, a fraction of the host time): eager builds its
    # mask without a read, but slower; GPT-2 looks for pads when given no mask; Llama's position ids make no mask a
    # packed-sequence search
    ("gpt2", "eager", ("built", "built")),
    ("gpt2", "sdpa", ("built", "built")),
    ("llama", "sdpa", ("built", "built")),
    ("gpt2", "varlen", ("causal", "built")),  # installed by the trainer on SDPA models: SDPA's causal path
    ("llama", "varlen", ("causal", "built")),
])
def test_each_model_gets_the_mask_form_it_reads_least(model_dirs, name, attention, expected):
    from fastppo.models import attention_masks, varlen_attention

    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_dirs[name], attn_implementation="sdpa" if attention == "varlen" else attention)
    if attention == "varlen":
        varlen_attention.install(model)
    form = attention_masks.choose_form(model, model, 64, torch.device("cpu"))
    assert tuple(form) == expected
    assert model.training  # the probe restores the mode it found


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_built_mask_is_transformers_own(model_dirs, attention, dtype):
    """`built` gives `prepared`'s tensor, element for element, for right, left and no padding; a model whose mask it
    does not build alike keeps transformers' (here: one whose builder is made to differ)."""
    from fastppo.models import attention_masks

    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dirs["llama"], attn_implementation=attention,
                                                              **dtype_kwarg(dtype))
    masks = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1] * 6])
    want, got = attention_masks.prepared(model.causal_lm, masks), attention_masks.built(model.causal_lm, masks)
    assert got.dtype == want.dtype == (dtype if attention == "eager" else torch.bool) and torch.equal(got, want)
    prepared = attention_masks.prepared
    attention_masks.prepared = lambda lm, mask: prepared(lm, mask.flip(-1))
    try:
        form = attention_masks.choose_form(model, model, 64, torch.device("cpu"), float32=dtype == torch.float32)
    finally:
        attention_masks.prepared = prepared
    assert "built" not in form


def test_the_trainer_runs_unpadded_rows_on_sdpas_causal_path(model_dir, tokenizer):
    """Rows of one length: no mask at all reaches SDPA (its is_causal path, flash on a GPU) and nothing is read."""
    import torch.nn.functional as F

    trainer = _trainer(model_dir, tokenizer, batch_size=4, mini_batch_size=2)
    queries = [torch.arange(2, 6) for _ in range(4)]
    responses = [torch.arange(6, 12) for _ in range(4)]
    trainer.step(queries, responses, [torch.tensor(1.0)] * 4)
    seen, sdpa = [], F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda *a, **k: seen.append((k.get("attn_mask"), k.get("is_causal"))) or sdpa(*a, **k)
    try:
        with HostReads() as reads:
            trainer.step(queries, responses, [torch.tensor(1.0)] * 4)
    finally:
        F.scaled_dot_product_attention = sdpa
    assert seen and all(mask is None and causal for mask, causal in seen)
    assert reads.total <= BUDGET, reads.report()
