"""PEFT (LoRA) policies: no reference copy, the adapter-disabled base is the reference."""

import os

import pytest
import torch

from conftest import make_batch
from fastppo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

peft = pytest.importorskip("peft")


@pytest.fixture()
def lora_model(gpt2_dir):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM",
                             fan_in_fan_out=True)
    return AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, peft_config=config)


def test_peft_policy_uses_the_adapter_free_base_as_reference(lora_model, tokenizer):
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-2), lora_model, None, tokenizer)
    assert trainer.is_peft_model and trainer.ref_model is None
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("v_head.") for n in trainable)
    batch = make_batch(tokenizer, 4)
    assert trainer.step(*batch)["objective/kl"] == 0.0  # LoRA starts as the identity
    trainer.step(*batch)
    padded = trainer._pad_batch(batch[0], batch[1], None)
    ids, am = padded.input_ids, padded.attention_mask
    rollout = trainer._rollout(padded)
    with lora_model.pretrained_model.disable_adapter(), torch.no_grad():
        base_logits = lora_model(input_ids=ids, attention_mask=am)[0][:, :-1]
    expected = torch.log_softmax(base_logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(rollout.ref_logprobs, expected)
    assert not torch.allclose(rollout.logprobs, rollout.ref_logprobs)


def test_peft_save_writes_adapter_and_value_head(lora_model, tmp_path):
    """TRL 0.11's PEFT layout: the adapter by PEFT, the value head alone in pytorch_model.bin."""
    lora_model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "adapter_config.json" in files and "pytorch_model.bin" in files
    assert set(torch.load(tmp_path / "pytorch_model.bin", weights_only=True)) == {"v_head.summary.weight",
                                                                                  "v_head.summary.bias"}
    assert "model.safetensors" not in files  # the frozen base is not duplicated


def test_peft_checkpoint_reloads_adapter_and_value_head(lora_model, tokenizer, tmp_path):
    """TRL's round trip: save a trained LoRA policy, `from_pretrained(dir)` gives the same policy back,
    a PeftModel (so the trainer's reference is still the adapter-free base)."""
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-2), lora_model, None, tokenizer)
    trainer.step(*make_batch(tokenizer, 4))  # move the adapter and the head away from their initial values
    lora_model.save_pretrained(tmp_path)
    ids = torch.randint(2, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(3))
    lora_model.eval()
    with torch.no_grad():
        expected = lora_model(input_ids=ids)
    for is_trainable in (False, True):
        loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, is_trainable=is_trainable).eval()
        assert loaded.is_peft_model
        with torch.no_grad():
            got = loaded(input_ids=ids)
        torch.testing.assert_close(got[0], expected[0])  # logits: the trained adapter is applied
        torch.testing.assert_close(got[2], expected[2])  # values: the trained head is restored
        trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
        assert any("lora_" in n for n in trainable) == is_trainable  # TRL: adapters load frozen unless asked
        assert all("lora_" in n or n.startswith("v_head.") for n in trainable)
