"""The value-head model: loading, forward, checkpoints (ours, plain transformers, TRL's layout)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import dtype_kwarg
from fastppo import AutoModelForCausalLMWithValueHead, create_reference_model


def _v_head(model):
    return {k: v.clone() for k, v in model.v_head.state_dict().items()}


def test_forward_returns_logits_loss_value(model_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir).eval()
    ids = torch.randint(2, 100, (2, 5))
    logits, loss, value = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert logits.shape == (2, 5, model.config.vocab_size) and logits.dtype == torch.float32
    assert loss is None
    assert value.shape == (2, 5)
    base_logits = model.pretrained_model(input_ids=ids).logits
    torch.testing.assert_close(logits, base_logits)


def test_logits_from_the_backbone_are_the_lms_own(model_dir):
    """With pass-through kwargs only, forward runs the backbone and the LM head itself (not the causal LM's forward):
    the same logits and values, to the bit, as the LM's forward with its hidden states; other calls take that path."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir).eval()
    ids = torch.randint(2, 100, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    full = model.pretrained_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    lm_calls = []
    hook = model.pretrained_model.register_forward_hook(lambda *_: lm_calls.append(1))
    try:
        logits, loss, value = model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert not lm_calls and loss is None
        torch.testing.assert_close(logits, full.logits, rtol=0, atol=0)
        torch.testing.assert_close(value, model.v_head(full.hidden_states[-1]).squeeze(-1), rtol=0, atol=0)
        _, loss, _ = model(input_ids=ids, attention_mask=mask, labels=ids)  # a loss: the LM's own forward
        assert lm_calls and loss is not None
        lm_calls.clear()
        model.pretrained_model.config.final_logit_softcapping = 30.0  # logits ≠ lm_head(hidden): never the shortcut
        model._plain_lm_head = None
        model(input_ids=ids, attention_mask=mask)
        assert lm_calls
    finally:
        hook.remove()


def test_model_kwargs_pass_through_and_value_head_kwargs_split(model_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_dir, **dtype_kwarg(torch.bfloat16), attn_implementation="eager",
        summary_dropout_prob=0.0, v_head_init_strategy="normal", v_head_initializer_range=1e-3,
    )
    assert model.pretrained_model.dtype == torch.bfloat16
    assert model.pretrained_model.config._attn_implementation == "eager"
    assert isinstance(model.v_head.dropout, torch.nn.Identity)
    assert model.v_head.summary.weight.abs().max() < 1e-2 and model.v_head.summary.bias.abs().max() == 0
    # logits upcast to float32 unless asked not to; the value head computes in float32
    ids = torch.randint(2, 100, (1, 4))
    logits, _, value = model(input_ids=ids)
    assert logits.dtype == torch.float32 and value.dtype == torch.float32
    raw_logits, _, _ = model(input_ids=ids, upcast_logits=False)
    assert raw_logits.dtype == torch.bfloat16


def test_unknown_value_head_strategy_is_an_error(gpt2_dir):
    with pytest.raises(ValueError, match="v_head_init_strategy"):
        AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir, v_head_init_strategy="xavier")


def test_generate_delegates(gpt2_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False),
                               model.pretrained_model.generate(ids, max_new_tokens=4, do_sample=False))


def test_save_and_load_round_trip(model_dir, tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    torch.nn.init.normal_(model.v_head.summary.weight)
    model.save_pretrained(tmp_path)
    keys = load_file(os.path.join(tmp_path, "model.safetensors")).keys()
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= set(keys)

    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, value in model.pretrained_model.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=0, atol=0)


def test_state_dict_layout_and_load_state_dict(gpt2_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    state = model.state_dict()
    assert "v_head.summary.weight" in state and "transformer.wte.weight" in state
    assert not any(k.startswith("pretrained_model.") for k in state)
    other = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    torch.nn.init.zeros_(other.v_head.summary.weight)
    other.load_state_dict(state)
    torch.testing.assert_close(other.v_head.summary.weight, model.v_head.summary.weight)


def test_checkpoint_in_trl_layout_loads(gpt2_dir, tmp_path):
    """TRL writes the base weights plus v_head.summary.* into one safetensors file (here by hand)."""
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    base.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    state = load_file(path)
    weight, bias = torch.randn(1, base.config.n_embd), torch.randn(1)
    state["v_head.summary.weight"], state["v_head.summary.bias"] = weight, bias
    save_file(state, path, metadata={"format": "pt"})

    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    torch.testing.assert_close(model.v_head.summary.weight, weight, rtol=0, atol=0)
    torch.testing.assert_close(model.v_head.summary.bias, bias, rtol=0, atol=0)


def test_sharded_and_bin_checkpoints_restore_the_head(gpt2_dir, tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    torch.nn.init.normal_(model.v_head.summary.weight)
    expected = _v_head(model)

    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.exists(sharded / "model.safetensors.index.json")
    assert _v_head(AutoModelForCausalLMWithValueHead.from_pretrained(sharded))["summary.weight"].equal(
        expected["summary.weight"])

    binary = tmp_path / "bin"
    os.makedirs(binary)
    model.pretrained_model.config.save_pretrained(binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    assert _v_head(AutoModelForCausalLMWithValueHead.from_pretrained(binary))["summary.bias"].equal(
        expected["summary.bias"])


def test_wrapping_a_built_model(gpt2_dir):
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base)
    assert model.pretrained_model is base


def test_push_to_hub_sends_the_value_head(gpt2_dir, monkeypatch):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    seen = {}

    def fake_push(self, repo_id, **kwargs):
        seen["keys"] = set(self.state_dict())
        seen["repo_id"] = repo_id

    monkeypatch.setattr(type(model.pretrained_model), "push_to_hub", fake_push)
    model.push_to_hub("me/model")
    assert seen["repo_id"] == "me/model" and "v_head.summary.weight" in seen["keys"]
    assert "v_head" not in dict(model.pretrained_model.named_children())


def test_create_reference_model_is_a_frozen_copy(gpt2_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    ref = create_reference_model(model)
    assert not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(ref.parameters()))


@pytest.mark.parametrize("arch, block", [("gpt2", "transformer.h.1."), ("llama", "model.layers.1.")])
def test_shared_layers_are_one_tensor_frozen_in_both(model_dirs, arch, block):
    """num_shared_layers=1: embeddings and block 0 (and what is tied to them) are the policy's own
    frozen tensors in the reference, not copies; the rest is copied as usual."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dirs[arch])
    names = [name for name, _ in model.named_parameters()]
    first_unshared = next(i for i, name in enumerate(names) if block in name)
    ref = create_reference_model(model, num_shared_layers=1)
    policy_params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    for index, name in enumerate(names):
        shared = index < first_unshared
        assert (policy_params[name] is ref_params[name]) == shared, name
        assert policy_params[name].requires_grad != shared and not ref_params[name].requires_grad, name
    assert any("embed" in name or "wte" in name for name in names[:first_unshared])
    if arch == "gpt2":  # tied to the shared embedding: frozen with it
        assert not model.lm_head.weight.requires_grad and model.lm_head.weight is ref.lm_head.weight
    same = create_reference_model(AutoModelForCausalLMWithValueHead.from_pretrained(model_dirs[arch]),
                                  num_shared_layers=1, pattern=block.replace("1", "{layer}"))
    assert sum(not p.requires_grad for p in same.parameters()) == len(names)


def test_shared_layers_need_a_block_to_stop_at(gpt2_dir):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir)
    for layers, pattern in ((2, None), (1, "decoder.block.{layer}.")):  # 2 blocks: none after them
        with pytest.raises(ValueError, match=f"num_shared_layers={layers}: no parameter name"):
            create_reference_model(model, num_shared_layers=layers, pattern=pattern)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen on the way


def test_model_without_lm_head_is_rejected(gpt2_dir):
    from transformers import AutoModel

    with pytest.raises(ValueError, match="language-model head"):
        AutoModelForCausalLMWithValueHead(AutoModel.from_pretrained(gpt2_dir))


def test_config_json_is_plain_transformers(gpt2_dir, tmp_path):
    AutoModelForCausalLMWithValueHead.from_pretrained(gpt2_dir).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as handle:
        assert json.load(handle)["model_type"] == "gpt2"
