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


# reward-model LoRA targets per architecture (GPT-2's attention is a Conv1D: fan_in_fan_out)
REWARD_LORA = {"gpt2": dict(target_modules=["c_attn"], fan_in_fan_out=True),
               "llama": dict(target_modules=["q_proj", "v_proj"])}


def reward_model_and_adapter(model_dir, arch, folder):
    """A PEFT sequence classifier over `model_dir` (random LoRA and score head) and where its adapter was saved."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="SEQ_CLS", init_lora_weights=False,
                             **REWARD_LORA[arch])
    reward_model = peft.get_peft_model(base, config).eval()
    reward_model.save_pretrained(folder)
    return reward_model, folder


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reward_score_of_a_tokenizers_whole_output(arch, model_dirs, tokenizer, tmp_path):
    """`compute_reward_score(**tokenizer(...))`, token_type_ids included (LlamaModel takes none on transformers
    4.46), scores as the reward model itself: its pooled score is ours at each row's last token."""
    reward_model, folder = reward_model_and_adapter(model_dirs[arch], arch, tmp_path / "rm")
    policy = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **REWARD_LORA[arch])
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dirs[arch], peft_config=policy,
                                                              reward_adapter=folder)
    # what a PreTrainedTokenizerFast (Llama 3's tokenizer class) returns by default on transformers 4.46
    batch = tokenizer(["the cat sat on the mat.", "a dog ran"], return_tensors="pt", padding=True,
                      return_token_type_ids=True)
    assert {"input_ids", "attention_mask", "token_type_ids"} <= set(batch)
    scores = model.compute_reward_score(**batch)
    assert scores.shape == (*batch["input_ids"].shape, 1)
    # GPT-2 embeds token types, Llama has none (and its classifier on transformers 4.46 takes no token_type_ids)
    reward_inputs = dict(batch) if arch == "gpt2" else {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = reward_model(**reward_inputs).logits  # [B, 1], at each row's last non-pad token
    last = batch["attention_mask"].sum(-1) - 1  # right padding
    torch.testing.assert_close(scores[torch.arange(2), last], expected, rtol=1e-5, atol=1e-5)
    if arch == "llama":  # it has no token types: the same scores without them
        without = model.compute_reward_score(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(scores, without, rtol=0, atol=0)
