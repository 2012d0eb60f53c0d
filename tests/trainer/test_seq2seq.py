"""Encoder-decoder policies: `AutoModelForSeq2SeqLMWithValueHead` and the trainer's encoder-decoder path.

`step` against TRL 0.11.4's numbers for a tiny T5 (tests/data/trl_seq2seq, made by its make_fixtures.py), the
value-head model's surface, generate → step → save → reload in plain transformers, and the refusals.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

from fastppo import (AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer,
                     create_reference_model)
from tolerances import TRAINER, WEIGHTS

DATA = Path(__file__).parents[1] / "data" / "trl_seq2seq"
TOKENIZER = Path(__file__).parents[1] / "data" / "trl_parity" / "tokenizer"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # TRL's numbers were recorded single-threaded
    yield
    torch.set_num_threads(threads)


def _policy(**kwargs):
    return AutoModelForSeq2SeqLMWithValueHead.from_pretrained(DATA / "init", attn_implementation="eager", **kwargs)


def _trainer(config=None, **kwargs):
    config = config or PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, seed=0)
    return PPOTrainer(config, _policy(), _policy(), AutoTokenizer.from_pretrained(TOKENIZER), **kwargs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["default", "kl_full"])
def test_step_matches_trl(case, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    config = PPOConfig(**json.loads((DATA / case / "config.json").read_text()), backend=backend)
    trainer = _trainer(config)
    assert trainer.is_encoder_decoder and config.is_encoder_decoder
    recorded = json.loads((DATA / case / "stats.json").read_text())["steps"]
    seen = {}
    compute_advantages = trainer.compute_advantages
    trainer.compute_advantages = lambda values, rewards, mask: (seen.__setitem__("mask", mask),
                                                                compute_advantages(values, rewards, mask))[1]
    for step, (inputs, expected) in enumerate(zip(torch.load(DATA / case / "inputs.pt")["steps"], recorded)):
        stats = trainer.step(inputs["queries"], inputs["responses"], inputs["scores"])
        assert set(stats) - set(expected["_all_keys"]) == {k for k in stats if k.startswith("fastppo/")}
        assert set(expected["_all_keys"]) <= set(stats)
        np.testing.assert_array_equal(seen["mask"].numpy(), np.asarray(expected["_masks"]))
        for key, value in expected.items():
            if key.startswith("_") or key.startswith("kl_ctl"):
                continue
            np.testing.assert_allclose(np.asarray(stats[key], np.float64), np.asarray(value, np.float64),
                                       err_msg=f"step {step} {key}", **TRAINER)
        assert trainer.kl_ctl.value == pytest.approx(expected["kl_ctl_value_after"], rel=1e-6)
    state = trainer.unwrapped_model.state_dict()
    for key, want in load_file(DATA / case / "final.safetensors").items():
        torch.testing.assert_close(state[key].float(), want, msg=lambda m: f"{key}: {m}", **WEIGHTS)


def test_model_surface_and_checkpoint_layout(tmp_path):
    model = _policy()
    assert model.is_encoder_decoder and isinstance(model.pretrained_model, T5ForConditionalGeneration)
    saved = load_file(DATA / "init" / "model.safetensors")
    torch.testing.assert_close(model.v_head.summary.weight.detach(), saved["v_head.summary.weight"], rtol=0, atol=0)
    query, decoder = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0, 4, 9, 1]])
    logits, loss, value = model(input_ids=query, attention_mask=torch.ones_like(query), decoder_input_ids=decoder)
    assert logits.shape == (1, 4, 64) and logits.dtype == torch.float32 and loss is None and value.shape == (1, 4)
    plain = model.pretrained_model(input_ids=query, decoder_input_ids=decoder)
    torch.testing.assert_close(logits, plain.logits)
    state = model.state_dict()  # TRL's keys; the file leaves out the weights tied to `shared`
    assert set(saved) <= set(state) and {"v_head.summary.weight", "v_head.summary.bias"} <= set(saved)
    assert all(k in ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
               for k in set(state) - set(saved))
    reference = create_reference_model(model)
    assert reference.is_encoder_decoder and not any(p.requires_grad for p in reference.parameters())
    with pytest.raises(ValueError, match="output must be 'logits'"):
        model(input_ids=query, decoder_input_ids=decoder, output="hidden")
    with pytest.raises(ValueError, match="reward adapter"):
        model.compute_reward_score(query)


def test_a_causal_lm_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(TypeError, match="encoder-decoder"):
        AutoModelForSeq2SeqLMWithValueHead(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2)))


def test_generate_step_save_reload(tmp_path):
    trainer = _trainer()
    tokenizer = trainer.tokenizer
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12, 13]), torch.tensor([14, 15])]
    kwargs = dict(min_new_tokens=3, max_new_tokens=5, do_sample=True, top_k=0, top_p=1.0, pad_token_id=0)
    responses = trainer.generate(queries, batch_size=2, **kwargs)
    for response in responses:  # the decoder's sequence from its start token, no prompt (TRL's enc-dec output)
        assert response[0] == trainer.unwrapped_model.config.decoder_start_token_id and len(response) >= 4
    single = trainer.generate(queries[0], **kwargs)
    assert single.dim() == 2 and single[0, 0] == 0
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    stats = trainer.step(queries, responses, [torch.tensor(1.0), torch.tensor(-1.0), torch.tensor(0.5),
                                              torch.tensor(0.0)])
    assert np.isfinite(stats["ppo/loss/total"]) and stats["fastppo/optimizer_steps"] == 2
    after = trainer.unwrapped_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.save_pretrained(tmp_path)
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, after[key], rtol=0, atol=0)
    reloaded = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.v_head.summary.weight, after["v_head.summary.weight"], rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id == tokenizer.pad_token_id


def test_response_masks_count_per_decoder_token():
    """A response mask is given per response token (the decoder start first); TRL's mask then keeps tokens 2.. ."""
    trainer = _trainer()
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11]), torch.tensor([14, 15])]
    responses = [torch.tensor([0, 20, 21, 22, 1]), torch.tensor([0, 30, 31]), torch.tensor([0, 40, 41, 42]),
                 torch.tensor([0, 50, 51, 52])]
    masks = [torch.tensor([1, 1, 1, 0, 1]), torch.ones(3, dtype=torch.long), torch.ones(4, dtype=torch.long),
             torch.tensor([1, 1, 0, 1])]
    inputs = trainer.prepare_model_inputs(queries, responses)
    assert set(inputs) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}
    logprobs, _, values, grid = trainer.batched_forward_pass(trainer.model, queries, responses, inputs,
                                                             response_masks=masks)
    assert logprobs.shape == values.shape == grid.shape == (4, 4)
    np.testing.assert_array_equal(grid.numpy(), [[0, 1, 0, 1], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]])
    padded = trainer._pad_batch(queries, responses, masks)
    torch.testing.assert_close(padded.mask, grid)
    torch.testing.assert_close(padded.encoder_input_ids, inputs["input_ids"])


@pytest.mark.parametrize("setting, match", [
    (dict(padding_free=True), "padding_free"),
    (dict(response_only_logits=True), "response_only_logits"),
    (dict(fused_lm_head=True), "fused_lm_head"),
    (dict(rollout_correction="tis"), "rollout_correction"),
    (dict(rollout_engine="vllm"), "rollout_engine='vllm'"),  # (refused before vLLM is looked for)
])
def test_paths_not_made_for_encoder_decoder_models_are_refused(setting, match):
    with pytest.raises(ValueError, match=match):
        _trainer(PPOConfig(batch_size=4, mini_batch_size=2, **setting))


def test_a_causal_reference_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    causal = AutoModelForCausalLMWithValueHead(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1,
                                                                           n_head=2)))
    with pytest.raises(ValueError, match="ref_model"):
        PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), _policy(), causal,
                   AutoTokenizer.from_pretrained(TOKENIZER))


def test_bad_step_input_changes_nothing():
    trainer = _trainer()
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    queries = [torch.tensor([5, 6])] * 4
    with pytest.raises(ValueError, match=r"responses\[2\] has 2 tokens"):
        trainer.step(queries, [torch.tensor([0, 7, 8])] * 2 + [torch.tensor([0, 7])] + [torch.tensor([0, 7, 8])],
                     [torch.tensor(1.0)] * 4)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        trainer.step(queries, [torch.tensor([0, 7, 8])] * 4, [torch.tensor(1.0)] * 4,
                     rollout_logprobs=[torch.zeros(3)] * 4)
    with pytest.raises(ValueError, match="return_logprobs"):
        trainer.generate(queries, return_logprobs=True, max_new_tokens=2)
    after = trainer.unwrapped_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and trainer.current_step == 0


def test_peft_seq2seq_policy_steps():
    peft = pytest.importorskip("peft")
    config = T5Config.from_pretrained(DATA / "init")
    base = T5ForConditionalGeneration.from_pretrained(DATA / "init", config=config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(base, peft_config=lora)
    assert model.is_peft_model
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1), model, None,
                         AutoTokenizer.from_pretrained(TOKENIZER))
    frozen = {k: v.clone() for k, v in base.state_dict().items() if "lora" not in k}
    queries = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11]), torch.tensor([14, 15])]
    responses = [torch.tensor([0, 20, 21, 22, 1]), torch.tensor([0, 30, 31]), torch.tensor([0, 40, 41, 42]),
                 torch.tensor([0, 50, 51, 52])]
    stats = trainer.step(queries, responses, [torch.tensor(1.0), torch.tensor(-1.0), torch.tensor(0.5),
                                              torch.tensor(0.0)])
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # reference = the base, adapter disabled: B = 0
    assert stats["fastppo/optimizer_steps"] == 2
    for key, value in base.state_dict().items():
        if "lora" not in key:
            assert torch.equal(value, frozen[key]), key


def test_trl_ppo_script_loop_with_use_seq2seq():
    """TRL 0.11's examples/scripts/ppo.py with --use_seq2seq, at toy size and with `trl` → `fastppo`: pad = eos,
    a dataset with a dict collator, the policy's and the reference's responses without prompts, step, log_stats."""
    from fastppo import set_seed
    from fastppo.core import LengthSampler

    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.pad_token_id = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(3)
    dataset = [{"input_ids": ids, "query": tokenizer.decode(ids)}
               for ids in (torch.randint(2, 64, (n,), generator=generator) for n in [3, 5, 2, 4, 6, 3, 4, 5])]
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2), _policy(), _policy(), tokenizer,
                         dataset=dataset, data_collator=lambda data: {k: [d[k] for d in data] for k in data[0]})
    generation_kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
                         "pad_token_id": tokenizer.eos_token_id}
    lengths = LengthSampler(4, 8)
    for batch in trainer.dataloader:
        responses, ref_responses = trainer.generate(batch["input_ids"], return_prompt=False,
                                                    generate_ref_response=True, length_sampler=lengths,
                                                    **generation_kwargs)
        batch["response"] = tokenizer.batch_decode(responses)
        batch["ref_response"] = tokenizer.batch_decode(ref_responses)
        rewards = [torch.tensor(float(len(r))) for r in responses]
        batch["ref_rewards"] = [torch.tensor(float(len(r))) for r in ref_responses]
        stats = trainer.step(batch["input_ids"], responses, rewards)
        trainer.log_stats(stats, batch, rewards, columns_to_log=["query", "response", "ref_response", "ref_rewards"])
        assert np.isfinite(stats["ppo/loss/total"]) and stats["fastppo/optimizer_steps"] == 4
    assert trainer.current_step == 0  # (log_with=None: TRL counts steps only for tensorboard)


def test_gradient_checkpointing_keeps_the_numbers():
    """With gradient checkpointing the training forward runs in train mode with dropout disabled: same step."""
    inputs = torch.load(DATA / "default" / "inputs.pt")["steps"][0]
    results = []
    for checkpointing in (False, True):
        trainer = _trainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, seed=0,
                                     gradient_checkpointing=checkpointing))
        stats = trainer.step(inputs["queries"], inputs["responses"], inputs["scores"])
        results.append([stats[k] for k in ("ppo/loss/total", "ppo/policy/approxkl", "ppo/val/error")])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-7)
