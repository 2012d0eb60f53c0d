"""fastppo.core: trl.core's public helpers (TRL 0.11) with TRL's signatures and results, against
float64 formulas written out here; and the names TRL scripts import from the top level."""

import numpy as np
import pytest
import torch

import fastppo
from fastppo import core


def test_top_level_exports_what_trl_scripts_import():
    from fastppo import (AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer,  # noqa: F401
                         PreTrainedModelWrapper, create_reference_model, set_seed)

    assert issubclass(AutoModelForCausalLMWithValueHead, PreTrainedModelWrapper)
    assert fastppo.core is core and set_seed is core.set_seed
    assert set(core.__all__) <= set(dir(core))


def test_logprobs_and_entropy_from_logits():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    logp = torch.log_softmax(logits.double(), -1)
    expected = logp.gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(core.logprobs_from_logits(logits, labels).double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(core.logprobs_from_logits(logits, labels, gather=False).double(), logp, rtol=1e-6,
                               atol=1e-6)
    entropy = torch.logsumexp(logits.double(), -1) - (logp.exp() * logits.double()).sum(-1)
    torch.testing.assert_close(core.entropy_from_logits(logits).double(), entropy, rtol=1e-5, atol=1e-6)


def test_masked_statistics_and_whitening():
    g = torch.Generator().manual_seed(1)
    values, mask = torch.randn(3, 8, generator=g), (torch.rand(3, 8, generator=g) > 0.3).float()
    picked = values[mask.bool()].double()
    assert float(core.masked_mean(values, mask)) == pytest.approx(float(picked.mean()), rel=1e-6)
    rows = (values.double() * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(core.masked_mean(values, mask, axis=1).double(), rows, rtol=1e-6, atol=1e-7)
    assert float(core.masked_var(values, mask)) == pytest.approx(float(picked.var()), rel=1e-5)
    assert float(core.masked_var(values, mask, unbiased=False)) == pytest.approx(float(picked.var(unbiased=False)),
                                                                                rel=1e-5)
    with pytest.raises(ValueError, match="sum of the mask is zero"):
        core.masked_var(values, torch.zeros_like(mask))
    whitened = core.masked_whiten(values, mask)
    expected = (values.double() - picked.mean()) / torch.sqrt(picked.var() + 1e-8)
    torch.testing.assert_close(whitened.double()[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
    shifted = core.masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(shifted.double(), whitened.double() + picked.mean(), rtol=1e-5, atol=1e-5)
    flat = values.flatten().double()
    whitened_flat = (values.double() - flat.mean()) / torch.sqrt(flat.var() + 1e-8)
    torch.testing.assert_close(core.whiten(values).double(), whitened_flat, rtol=1e-5, atol=1e-5)


def test_clip_by_value_with_tensor_and_number_bounds():
    x = torch.tensor([-3.0, -0.5, 0.2, 4.0])
    assert core.clip_by_value(x, -1.0, 1.0).tolist() == pytest.approx([-1.0, -0.5, 0.2, 1.0])
    lower, upper = torch.tensor([-4.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.1, 5.0])
    assert core.clip_by_value(x, lower, upper).tolist() == pytest.approx([-3.0, 0.0, 0.1, 4.0])


def test_top_k_top_p_filtering():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0], [0.0, 0.0, 10.0, 0.0]])
    top2 = core.top_k_top_p_filtering(logits.clone(), top_k=2)
    assert torch.isfinite(top2[0]).tolist() == [False, True, False, True]  # 4 and 3 stay
    assert torch.isfinite(top2[1]).all()  # ties with the 2nd largest (0) all stay, as in transformers
    nucleus = core.top_k_top_p_filtering(logits.clone(), top_p=0.5)
    assert torch.isfinite(nucleus[1]).sum() == 1 and torch.isfinite(nucleus[1, 2])  # one token holds > 0.5


def test_statistics_dict_helpers():
    assert core.flatten_dict({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}
    with pytest.raises(ValueError, match="separator"):
        core.flatten_dict({"a/b": 1})
    scalars = core.convert_to_scalar({"t": torch.tensor([2.5]), "n": np.array(1.5), "v": np.array([1.0, 2.0])})
    assert scalars["t"] == 2.5 and scalars["n"] == 1.5 and isinstance(scalars["v"], np.ndarray)
    stacked = core.stack_dicts([{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0])}])
    assert stacked["x"].tolist() == [[1.0, 2.0], [3.0, core.WANDB_PADDING]]
    assert core.add_suffix({"a": 1}, "_x") == {"a_x": 1}
    assert core.pad_to_size(torch.tensor([[1, 2]]), 4, padding=0).tolist() == [[1, 2, 0, 0]]
    averaged = core.average_torch_dicts([{"a": torch.tensor([1.0, 3.0])}, {"a": torch.tensor([3.0, 5.0])}])
    assert averaged["a"].tolist() == [2.0, 4.0]
    as_np = core.stats_to_np({"b": torch.tensor([1.5], dtype=torch.bfloat16), "s": np.float32(2.0), "o": "x"})
    assert as_np["b"].dtype == np.float32 and as_np["s"] == 2.0 and isinstance(as_np["s"], float) and as_np["o"] == "x"


def test_seeding_and_length_sampling():
    core.set_seed(3)
    first = (torch.rand(2).tolist(), np.random.rand())
    core.set_seed(3)
    assert (torch.rand(2).tolist(), np.random.rand()) == first
    sampler = core.LengthSampler(4, 7)
    assert {sampler() for _ in range(200)} == {4, 5, 6}
    with core.PPODecorators.empty_device_cache():
        pass


def test_randn_tensor_shape_generators_dtype_and_device():
    noise = core.randn_tensor((3, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert noise.shape == (3, 4) and noise.dtype == torch.float64 and noise.device.type == "cpu"
    assert noise.equal(torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    # a list: row i from generator i, so each row is reproducible whatever the others' seeds
    rows = core.randn_tensor((2, 3, 2), generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    assert rows.shape == (2, 3, 2)
    assert rows[1].equal(torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(8))[0])
    single = core.randn_tensor([2, 2], generator=[torch.Generator().manual_seed(1)])  # one in a list: as one
    assert single.equal(torch.randn(2, 2, generator=torch.Generator().manual_seed(1)))
    assert core.randn_tensor((2,), layout=torch.strided, device="cpu").shape == (2,)
    with pytest.raises(ValueError, match="one per row of shape\\[0\\]=3"):
        core.randn_tensor((3, 2), generator=[torch.Generator(), torch.Generator()])


def test_randn_tensor_with_a_cpu_generator_for_another_device():
    # no accelerator here: "meta" stands in for one (a CPU generator cannot draw on it either)
    with pytest.warns(UserWarning, match="generator is on the CPU"):
        noise = core.randn_tensor((2, 3), generator=torch.Generator().manual_seed(0), device="meta")
    assert noise.device.type == "meta" and noise.shape == (2, 3)
    fake_cuda = type("FakeGenerator", (), {"device": torch.device("cuda", 0)})()
    with pytest.raises(ValueError, match="cannot draw a cpu tensor from a cuda generator"):
        core.randn_tensor((2,), generator=fake_cuda)
