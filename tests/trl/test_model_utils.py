"""trl.models.utils' names: setup_chat_format, SUPPORTED_ARCHITECTURES, unwrap_model_for_generation."""

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

import fastppo
from fastppo import AutoModelForCausalLMWithValueHead, setup_chat_format, unwrap_model_for_generation


def test_setup_chat_format_adds_chatml(gpt2_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    before = len(tokenizer)
    model, tokenizer = setup_chat_format(model, tokenizer, resize_to_multiple_of=64)
    assert len(tokenizer) == before + 2
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tokenizer)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id and model.config.bos_token_id == tokenizer.bos_token_id
    text = tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # one token, not split by the BPE


def test_setup_chat_format_refuses_other_formats(gpt2_dir, tokenizer):
    with pytest.raises(ValueError, match="format must be 'chatml'"):
        setup_chat_format(AutoModelForCausalLM.from_pretrained(gpt2_dir), tokenizer, format="zephyr")


def test_supported_architectures_and_unwrap_for_generation(gpt2_dir):
    assert fastppo.SUPPORTED_ARCHITECTURES == (AutoModelForCausalLMWithValueHead,
                                               fastppo.AutoModelForSeq2SeqLMWithValueHead)
    accelerator = Accelerator()
    model = accelerator.prepare(AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir))
    with unwrap_model_for_generation(model, accelerator) as unwrapped:
        assert unwrapped is accelerator.unwrap_model(model)
        out = unwrapped.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
