"""A reward model's LoRA adapter loaded beside the policy's in one PEFT model (TRL 0.11's `reward_adapter=`).

The reward model was trained as a PEFT sequence classifier (`task_type="SEQ_CLS"`): PEFT keeps
its `score` head (a `Linear(hidden, num_labels)`) among the adapter's saved tensors, e.g.
`base_model.model.score.weight`. Its LoRA weights load into the policy's PEFT model as a second,
frozen adapter; the score head becomes a frozen `nn.Linear` of the wrapper; scoring runs the
model with that adapter active and applies the head to the last hidden state.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .checkpoint_files import load_adapter_state, resolve_file


def load_reward_adapter(peft_model, source: str, adapter_name: str, load_kwargs: dict, score_modules=("score",),
                        argument_names=("reward_adapter", "reward_adapter_name")) -> nn.Linear:
    """Load the adapter saved at `source` (a directory or hub repo id) into `peft_model` as `adapter_name`.

    Returns its score head: a frozen `nn.Linear(hidden, num_labels)` in the model's dtype, on the
    device of the model's output embeddings. The first name in `score_modules` found among the
    adapter's tensors (as `<name>.weight`) is the head. The model's train/eval mode is kept (PEFT's
    `load_adapter` switches to eval). Raises ValueError naming `argument_names[0]` (the caller's name
    for `source`) when `source` holds no PEFT adapter or no score head, and naming `argument_names[1]`
    when the model already has an adapter of that name.
    """
    source_arg, name_arg = argument_names
    if resolve_file(source, "adapter_config.json", load_kwargs) is None:
        raise ValueError(f"{source_arg}={source!r}: no adapter_config.json there; pass a local directory or "
                         "hub repo id of a reward-model adapter saved with PEFT's save_pretrained")
    state = load_adapter_state(source, load_kwargs)
    if state is None:
        raise ValueError(f"{source_arg}={source!r}: no adapter_model.safetensors or adapter_model.bin there")
    score = _score_tensors(state, score_modules)
    if "weight" not in score:
        raise ValueError(f"{source_arg}={source!r}: the adapter has no score head (no tensor named "
                         f"{' or '.join(f'`{name}.weight`' for name in score_modules)}); save the reward model "
                         "with LoraConfig(task_type='SEQ_CLS') so that PEFT stores its head in the adapter")
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"{name_arg}={adapter_name!r} is already the name of one of the model's adapters")
    hub_kwargs = {"token": load_kwargs["token"]} if load_kwargs.get("token") is not None else {}
    training = peft_model.training
    peft_model.load_adapter(source, adapter_name, is_trainable=False, **hub_kwargs)
    peft_model.train(training)

    num_labels, hidden_size = score["weight"].shape
    head = nn.Linear(hidden_size, num_labels, bias="bias" in score)
    head.load_state_dict(score)
    head.requires_grad_(False)
    device = peft_model.get_output_embeddings().weight.device
    return head.to(device=device, dtype=peft_model.get_base_model().dtype)


def _score_tensors(state: dict, score_modules) -> dict:
    """`{"weight": ..., "bias": ...}` of the first module in `score_modules` that `state` holds."""
    for name in score_modules:
        # the module's own parameters: `...<name>.weight`, not a LoRA pair wrapped around it
        tensors = {key.rsplit(".", 1)[1]: value for key, value in state.items()
                   if key.split(".")[-2:-1] == [name]}
        if tensors:
            return tensors
    return {}


@contextlib.contextmanager
def adapter_active(peft_model, adapter_name: str, restore_name: str):
    """Run with `adapter_name` active and the model in eval mode; then `restore_name` is active again.

    PEFT's `set_adapter` marks the adapter it activates trainable, so every `requires_grad` flag
    and the train/eval mode are put back as they were.
    """
    flags = [(parameter, parameter.requires_grad) for parameter in peft_model.parameters()]
    training = peft_model.training
    peft_model.set_adapter(adapter_name)
    peft_model.eval()
    try:
        yield
    finally:
        peft_model.set_adapter(restore_name)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        peft_model.train(training)

