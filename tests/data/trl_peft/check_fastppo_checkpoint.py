"""Load a fastppo-written PEFT value-head checkpoint with TRL 0.11.4 and compare what TRL computes with it.

    /tmp/trl011/bin/python tests/data/trl_peft/check_fastppo_checkpoint.py DIR

DIR is what fastppo's `save_pretrained` wrote for a LoRA policy, plus `fastppo_outputs.safetensors`:
fastppo's logits and values on this folder's fixed inputs (expected.safetensors) and its value head
(README.md shows how to write both). Runs in TRL's environment only; never imports fastppo. Exits
non-zero when TRL loads a different value head or computes different numbers.
"""

import os
import sys

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))


def main(directory):
    from trl import AutoModelForCausalLMWithValueHead

    torch.set_num_threads(1)
    inputs = load_file(os.path.join(HERE, "expected.safetensors"))
    ours = load_file(os.path.join(directory, "fastppo_outputs.safetensors"))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(directory, attn_implementation="eager").eval()
    assert model.is_peft_model, "TRL did not load the directory as a PEFT adapter"
    with torch.no_grad():
        logits, _, values = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    got = {"v_head.summary.weight": model.v_head.summary.weight, "v_head.summary.bias": model.v_head.summary.bias,
           "logits": logits, "values": values}
    worst = 0.0
    for name, value in got.items():
        error = (value.detach() - ours[name]).abs().max().item()
        worst = max(worst, error)
        print(f"{name:24s} max |TRL - fastppo| = {error:.3g}")
    if worst > 1e-5:
        sys.exit(f"mismatch: {worst:.3g} > 1e-5")
    print("ok: TRL 0.11.4 loads the fastppo checkpoint with the same adapter and value head")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
