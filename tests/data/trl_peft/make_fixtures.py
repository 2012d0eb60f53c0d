"""Regenerate the TRL 0.11.4 PEFT value-head fixtures in this folder (tests/data/trl_peft/).

Produces (see README.md):
  policy/          a LoRA policy + value head, written by trl.AutoModelForCausalLMWithValueHead.save_pretrained
  reward_adapter/  a LoRA reward-model adapter with its `score` head, written by PEFT (SEQ_CLS task)
  expected.safetensors  fixed inputs and what TRL computes on them after loading both (logits, values,
                   compute_reward_score)

Run it in TRL's environment (see tests/data/trl_parity/make_fixtures.py); it never imports fastppo:

    /tmp/trl011/bin/python tests/data/trl_peft/make_fixtures.py

The base model is tests/data/trl_parity/init. Every model is loaded from the repository root by
that *relative* path, so the `base_model_name_or_path` PEFT stores in adapter_config.json does not
name this machine's directories (it resolves from the repository root; tests rewrite it).
"""

import os
import shutil

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
BASE = "tests/data/trl_parity/init"  # relative to ROOT, on purpose (see the docstring)
POLICY_DIR = os.path.join(HERE, "policy")
REWARD_DIR = os.path.join(HERE, "reward_adapter")
EXPECTED = os.path.join(HERE, "expected.safetensors")


def lora_config(task_type):
    from peft import LoraConfig

    # init_lora_weights=False: random A and B, so the adapter changes the outputs (B=0 would not)
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True,
                      task_type=task_type, init_lora_weights=False)


def make_policy():
    from trl import AutoModelForCausalLMWithValueHead

    torch.manual_seed(1)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(BASE, peft_config=lora_config("CAUSAL_LM"),
                                                              attn_implementation="eager")
    # the base checkpoint carries a value head that TRL restores; move it somewhere recognisable
    with torch.no_grad():
        model.v_head.summary.weight.normal_(0.0, 0.5)
        model.v_head.summary.bias.fill_(0.25)
    os.makedirs(POLICY_DIR)  # TRL writes pytorch_model.bin before PEFT creates the directory
    model.save_pretrained(POLICY_DIR)


def make_reward_adapter():
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(2)
    # the `score` head is new (random, std 0.02): scale it so rewards are O(1)
    model = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1, attn_implementation="eager")
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    # SEQ_CLS: PEFT adds `score` to modules_to_save, so the head is stored in the adapter's state
    get_peft_model(model, lora_config("SEQ_CLS")).save_pretrained(REWARD_DIR)


def make_expected():
    from safetensors.torch import save_file
    from trl import AutoModelForCausalLMWithValueHead

    input_ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0  # right padding, as TRL pads
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        os.path.relpath(POLICY_DIR, ROOT), reward_adapter=os.path.relpath(REWARD_DIR, ROOT),
        attn_implementation="eager")
    assert model.is_peft_model and model.supports_rm_adapter
    model.eval()  # loading the reward adapter leaves TRL's model in train mode (dropout on)
    with torch.no_grad():
        reward_scores = model.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask)
        logits, _, values = model(input_ids=input_ids, attention_mask=attention_mask)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits, "values": values,
               "reward_scores": reward_scores, "v_head.summary.weight": model.v_head.summary.weight,
               "v_head.summary.bias": model.v_head.summary.bias}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, EXPECTED)


def main():
    torch.set_num_threads(1)
    os.chdir(ROOT)
    for path in (POLICY_DIR, REWARD_DIR):
        shutil.rmtree(path, ignore_errors=True)
    make_policy()
    make_reward_adapter()
    make_expected()
    paths = [os.path.join(d, f) for d, _, files in os.walk(HERE) for f in files]
    for path in paths:
        os.chmod(path, 0o644)  # safetensors writes 0600
    total = sum(os.path.getsize(path) for path in paths)
    assert total < 1_000_000, total


if __name__ == "__main__":
    main()
