"""fastppo.rollout.sampling: HF generate kwargs → vLLM SamplingParams kwargs, each supported kwarg and each refused one."""

import pytest
from transformers import GenerationConfig

from fastppo.rollout.sampling import UNTRANSLATABLE_CONFIG, resolve, sampling_params_kwargs


def translate(prompt_lengths=(3,), return_logprobs=False, config=None, **kwargs):
    return sampling_params_kwargs(resolve(kwargs, config), list(prompt_lengths), return_logprobs)


def test_trl_quickstart_kwargs():
    (params,) = translate(min_length=-1, top_k=0.0, top_p=1.0, do_sample=True, pad_token_id=1, max_new_tokens=20)
    assert params == dict(n=1, max_tokens=20, min_tokens=0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                          repetition_penalty=1.0, stop_token_ids=[], ignore_eos=True, detokenize=False, logprobs=None)


def test_hf_defaults_apply_when_nothing_is_set():
    (params,) = translate(prompt_lengths=(5,), do_sample=True)
    assert params["max_tokens"] == 15  # max_length 20 counts the 5-token prompt
    assert params["top_k"] == 50 and params["temperature"] == 1.0  # HF's sampling defaults
    (greedy,) = translate()
    assert greedy["temperature"] == 0.0  # do_sample defaults to False: greedy


def test_sampling_kwargs_pass_through():
    (params,) = translate(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                          max_new_tokens=12, min_new_tokens=4, return_logprobs=True)
    assert (params["temperature"], params["top_k"], params["top_p"], params["min_p"]) == (0.7, 20, 0.9, 0.05)
    assert (params["repetition_penalty"], params["max_tokens"], params["min_tokens"]) == (1.3, 12, 4)
    assert params["logprobs"] == 0  # the sampled token's log-prob only


def test_greedy_ignores_sampling_settings_as_hf_does():
    (params,) = translate(do_sample=False, temperature=0.3, top_k=5, top_p=0.5, max_new_tokens=4)
    assert (params["temperature"], params["top_k"], params["top_p"]) == (0.0, 0, 1.0)


def test_lengths_counting_the_prompt_are_per_prompt():
    params = translate(prompt_lengths=(3, 8), max_length=12, min_length=6)
    assert [p["max_tokens"] for p in params] == [9, 4]
    assert [p["min_tokens"] for p in params] == [3, 0]
    # max_new_tokens wins over max_length, as in HF
    assert [p["max_tokens"] for p in translate(prompt_lengths=(3, 8), max_length=12, max_new_tokens=5)] == [5, 5]


def test_length_sampler_overrides_per_prompt():
    params = sampling_params_kwargs(resolve({"max_new_tokens": 10}), [3, 3, 3], False, [4, 4, 7])
    assert [p["max_tokens"] for p in params] == [4, 4, 7]


def test_eos_tokens_become_stop_tokens():
    assert translate(eos_token_id=7)[0]["stop_token_ids"] == [7]
    assert translate(eos_token_id=[7, 9])[0]["stop_token_ids"] == [7, 9]
    assert translate(eos_token_id=None)[0]["stop_token_ids"] == []  # no EOS: run to the limit
    config = GenerationConfig(eos_token_id=2)
    assert translate(config=config)[0]["stop_token_ids"] == [2]  # the model's own EOS, as HF uses it
    assert translate(config=config, eos_token_id=None)[0]["stop_token_ids"] == []  # the kwarg wins, even None


def test_model_generation_config_is_the_base_and_kwargs_override_it():
    config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.8, max_new_tokens=7)
    (params,) = translate(config=config)
    assert (params["temperature"], params["top_p"], params["max_tokens"]) == (0.6, 0.8, 7)
    (params,) = translate(config=config, temperature=1.2, top_k=None)  # None = unset: the config's value stays
    assert (params["temperature"], params["top_k"]) == (1.2, 50)
    (params,) = translate(config=config, generation_config=GenerationConfig(max_new_tokens=3))  # replaces the model's
    assert (params["temperature"], params["max_tokens"]) == (0.0, 3)


def test_num_return_sequences_and_seeds():
    params = translate(prompt_lengths=(3, 4), do_sample=True, num_return_sequences=3, seed=5, max_new_tokens=2)
    assert [p["n"] for p in params] == [3, 3]
    assert [p["seed"] for p in params] == [5, 6]  # one seed per prompt, or equal prompts would sample equally
    assert "seed" not in translate(do_sample=True)[0]


def test_no_effect_kwargs_are_accepted():
    assert translate(use_cache=False, bos_token_id=1, pad_token_id=0) == translate()


@pytest.mark.parametrize("name, value", [
    ("num_beams", 2), ("no_repeat_ngram_size", 3), ("bad_words_ids", [[5]]), ("logits_processor", []),
    ("output_scores", True), ("return_dict_in_generate", True), ("typical_p", 0.5), ("penalty_alpha", 0.6),
    ("stopping_criteria", []), ("attention_mask", None), ("max_time", 1.0), ("streamer", object()),
])
def test_untranslatable_kwargs_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        translate(**{name: value})


@pytest.mark.parametrize("name", sorted(set(UNTRANSLATABLE_CONFIG) - {"watermarking_config"}))
def test_untranslatable_model_config_settings_are_refused(name):
    value = {"num_beams": 3, "num_beam_groups": 2, "penalty_alpha": 0.5, "typical_p": 0.5, "epsilon_cutoff": 0.01,
             "eta_cutoff": 0.01, "diversity_penalty": 0.5, "no_repeat_ngram_size": 2, "encoder_no_repeat_ngram_size": 2,
             "bad_words_ids": [[4]], "force_words_ids": [[4]], "forced_bos_token_id": 4, "forced_eos_token_id": 4,
             "suppress_tokens": [4], "begin_suppress_tokens": [4], "sequence_bias": {(4,): 1.0},
             "exponential_decay_length_penalty": (2, 1.5), "encoder_repetition_penalty": 1.2, "guidance_scale": 2.0,
             "renormalize_logits": True, "remove_invalid_values": True, "dola_layers": "low",
             "stop_strings": ["x"], "max_time": 2.0, "token_healing": True, "length_penalty": 0.5}[name]
    config = GenerationConfig()
    setattr(config, name, value)
    with pytest.raises(ValueError, match=f"generation_config.{name}"):
        translate(config=config)


@pytest.mark.parametrize("kwargs, message", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_return_sequences=2), "num_return_sequences"),  # greedy: one sequence, as HF refuses too
    (dict(do_sample="yes"), "do_sample"),
    (dict(seed=-1), "seed"),
    (dict(eos_token_id="</s>"), "eos_token_id"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_length=3), "max_length"),  # a 3-token prompt leaves no room
])
def test_bad_values_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        translate(**kwargs)
