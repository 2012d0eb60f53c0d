"""ops.py: the backend switch and argument checks (the reference path; kernels have their own tests)."""

import pytest
import torch

from fastppo import ops, reference


def test_torch_backend_always_resolves_to_torch(monkeypatch):
    monkeypatch.setenv("FASTPPO_BACKEND", "triton")
    assert ops.resolve_backend("torch", torch.device("cpu")) == "torch"


def test_auto_on_cpu_without_interpreter_is_torch(monkeypatch):
    monkeypatch.delenv("FASTPPO_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        ops.resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend='triton'"):
        ops.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1.0, 1.0, backend="triton")


def test_env_variable_steers_auto(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTPPO_BACKEND", "triton")
    with pytest.raises(RuntimeError):
        ops.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.setenv("FASTPPO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTPPO_BACKEND"):
        ops.resolve_backend(None, torch.device("cpu"))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("cuda", torch.device("cpu"))


def test_op_without_kernel_under_interpreter_is_explicit(monkeypatch):
    """With Triton runnable but no kernel for an op: auto falls back, an explicit request errors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTPPO_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_kernel", lambda op: None)
    if ops._triton_import_error() is not None:
        pytest.skip("triton is not installed")
    rewards = torch.randn(2, 3)
    adv, _ = ops.gae(rewards, torch.zeros(2, 3), torch.ones(2, 3), 1.0, 1.0)  # auto → reference
    torch.testing.assert_close(adv, reference.gae(rewards, torch.zeros(2, 3), torch.ones(2, 3), 1.0, 1.0)[0])
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        ops.gae(rewards, torch.zeros(2, 3), torch.ones(2, 3), 1.0, 1.0, backend="triton")


def test_logprobs_accepts_a_non_contiguous_view():
    logits = torch.randn(2, 6, 13)
    ids = torch.randint(0, 13, (2, 6))
    view = logits[:, :-1]
    assert not view.is_contiguous()
    torch.testing.assert_close(ops.logprobs_from_logits(view, ids[:, 1:]),
                               ops.logprobs_from_logits(view.contiguous(), ids[:, 1:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_are_float32_for_half_inputs(dtype):
    logits = torch.randn(3, 17).to(dtype)
    out = ops.logprobs_from_logits(logits, torch.tensor([0, 4, 16]))
    assert out.dtype == torch.float32 and (out <= 0).all()


def test_argument_errors_name_the_argument():
    logits = torch.randn(2, 5)
    with pytest.raises(TypeError, match="labels must be an integer"):
        ops.logprobs_from_logits(logits, torch.zeros(2))
    with pytest.raises(ValueError, match="labels shape"):
        ops.logprobs_from_logits(logits, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        ops.logprobs_from_logits(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        ops.logprobs_from_logits(logits, torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="values must have the shape of rewards"):
        ops.gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        ops.gae(torch.zeros(3), torch.zeros(3), torch.ones(3), 1.0, 1.0)
    with pytest.raises(ValueError, match="estimator"):
        ops.kl_penalty_rewards(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1), 0.1, "kl2")
    with pytest.raises(ValueError, match="needs kl="):
        ops.kl_penalty_rewards(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1), 0.1, "full")
    with pytest.raises(ValueError, match="scores must be"):
        ops.kl_penalty_rewards(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="ref_logits must have the shape"):
        ops.full_kl(torch.zeros(2, 5), torch.zeros(2, 6))


def test_ppo_loss_backpropagates_through_ops():
    logprobs = torch.randn(2, 4, requires_grad=True)
    values = torch.randn(2, 4, requires_grad=True)
    out = ops.ppo_loss(logprobs, logprobs.detach() + 0.1, values, values.detach(), torch.randn(2, 4),
                       torch.randn(2, 4), torch.ones(2, 4), 0.2, 0.2, 0.1)
    out.loss.backward()
    assert logprobs.grad is not None and values.grad is not None


def test_ppo_loss_rollout_logprobs_reach_the_loss_and_stats():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 4, generator=g) for _ in range(6)]
    rollout = tensors[1] - 0.5 * torch.randn(2, 4, generator=g)
    plain = ops.ppo_loss(*tensors, torch.ones(2, 4), 0.2, 0.2, 0.1, backend="torch")
    assert plain.tis_weight_mean is None and plain.tis_clipfrac is None
    out = ops.ppo_loss(*tensors, torch.ones(2, 4), 0.2, 0.2, 0.1, backend="torch",
                       rollout_logprobs=rollout.bfloat16(), rollout_is_cap=1)  # any float dtype; an int cap
    expected = reference.ppo_loss(*tensors, torch.ones(2, 4), 0.2, 0.2, 0.1, rollout_logprobs=rollout.bfloat16(),
                                  rollout_is_cap=1.0)
    for name in ("loss", "pg_loss", "tis_weight_mean", "tis_clipfrac"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name))


def test_ppo_loss_rollout_argument_errors_name_the_argument():
    tensors = [torch.randn(2, 4) for _ in range(6)]
    mask = torch.ones(2, 4)

    def call(**kwargs):
        return ops.ppo_loss(*tensors, mask, 0.2, 0.2, 0.1, backend="torch", **kwargs)

    with pytest.raises(ValueError, match="rollout_logprobs must have the shape of logprobs"):
        call(rollout_logprobs=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="rollout_logprobs must be 2-D"):
        call(rollout_logprobs=torch.zeros(8))
    with pytest.raises(TypeError, match="rollout_logprobs must be a floating-point"):
        call(rollout_logprobs=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="rollout_logprobs must be a torch.Tensor"):
        call(rollout_logprobs=[[0.0] * 4] * 2)
    with pytest.raises(ValueError, match="rollout_logprobs is on meta"):
        call(rollout_logprobs=torch.zeros(2, 4, device="meta"))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rollout_is_cap must be a finite number > 0"):
            call(rollout_logprobs=torch.zeros(2, 4), rollout_is_cap=bad)
    for bad in ("2", True):
        with pytest.raises(TypeError, match="rollout_is_cap must be a number"):
            call(rollout_logprobs=torch.zeros(2, 4), rollout_is_cap=bad)
    rollout = torch.zeros(2, 4)  # None is the default cap, 2.0
    assert call(rollout_logprobs=rollout, rollout_is_cap=None).loss == call(rollout_logprobs=rollout).loss
    with pytest.raises(ValueError, match="rollout_is_cap"):  # checked also without rollout log-probs
        call(rollout_is_cap=0.0)
