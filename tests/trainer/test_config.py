"""PPOConfig: TRL's names and defaults, and errors at construction."""

import dataclasses

import pytest

from fastppo import PPOConfig

TRL_0_11_DEFAULTS = dict(
    seed=0, log_with=None, steps=20000, learning_rate=1.41e-5, adap_kl_ctrl=True, init_kl_coef=0.2, kl_penalty="kl",
    target=6.0, horizon=10000.0, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
    batch_size=128, mini_batch_size=128, gradient_accumulation_steps=1, ppo_epochs=4, max_grad_norm=None,
    early_stopping=False, target_kl=1.0, ratio_threshold=10.0, use_score_scaling=False, use_score_norm=False,
    score_clip=None, whiten_rewards=False, gradient_checkpointing=False, optimize_device_cache=False,
    compare_steps=1, tracker_project_name="trl",
)


def test_defaults_are_trl_classic():
    config = PPOConfig()
    for name, value in TRL_0_11_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.backend == "auto"
    assert config.backward_batch_size == 128


def test_every_field_has_a_docstring_line():
    import inspect

    source = inspect.getsource(PPOConfig)
    for f in dataclasses.fields(PPOConfig):
        after = source.split(f"\n    {f.name}:", 1)[1].split("\n", 2)[1].strip()
        assert after.startswith('"""'), f.name


@pytest.mark.parametrize("kwargs,field", [
    (dict(batch_size=4, mini_batch_size=3), "batch_size"),
    (dict(batch_size=4, mini_batch_size=2, gradient_accumulation_steps=3), "batch_size"),
    (dict(kl_penalty="kl2"), "kl_penalty"),
    (dict(cliprange=-0.1), "cliprange"),
    (dict(cliprange_value=-1.0), "cliprange_value"),
    (dict(batch_size=0), "batch_size"),
    (dict(ppo_epochs=0), "ppo_epochs"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(gamma=1.5), "gamma"),
    (dict(lam=-0.1), "lam"),
    (dict(target=0.0), "target"),
    (dict(horizon=-1.0), "horizon"),
    (dict(vf_coef=-1.0), "vf_coef"),
    (dict(score_clip=0.0), "score_clip"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(backend="cuda"), "backend"),
    (dict(use_score_norm=True), "use_score_norm"),
    (dict(mini_batch_size=2.0), "mini_batch_size"),
    (dict(dual_clip=1.0), "dual_clip must be a number > 1"),
    (dict(compare_steps=0), "compare_steps"),
])
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**kwargs)


def test_forward_batch_size_overrides_mini_batch_size():
    config = PPOConfig(batch_size=8, forward_batch_size=4)
    assert config.mini_batch_size == 4 and config.backward_batch_size == 4


def test_to_dict_flattens_nested_dicts():
    flat = PPOConfig(tracker_kwargs={"wandb": {"entity": "me"}}).to_dict()
    assert flat["tracker_kwargs/wandb"] == {"entity": "me"} and flat["batch_size"] == 128


def test_clip_higher_fields():
    from fastppo.training.ppo_epochs import ratio_clip

    assert ratio_clip(PPOConfig()) == 0.2  # TRL's number, untouched
    assert ratio_clip(PPOConfig(cliprange_low=0.2, cliprange_high=0.2)) == 0.2
    assert ratio_clip(PPOConfig(cliprange_high=0.28)) == (0.2, 0.28)
    assert ratio_clip(PPOConfig(cliprange=0.1, cliprange_low=0.3)) == (0.3, 0.1)
    for name in ("cliprange_low", "cliprange_high"):
        with pytest.raises(ValueError, match=f"PPOConfig.{name}"):
            PPOConfig(**{name: -0.1})
        assert getattr(PPOConfig(**{name: float("inf")}), name) == float("inf")  # no clip on that side
